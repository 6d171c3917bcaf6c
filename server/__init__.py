"""Flower ServerApp side of brainjepa (strategy, aggregation, checkpoints)."""
