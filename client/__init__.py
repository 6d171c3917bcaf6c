"""Flower ClientApp side of brainjepa (one site's round)."""
