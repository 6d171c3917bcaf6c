"""Transport benchmark Flower app (see scripts/transport_bench.py)."""
