"""brainjepa: Brain-JEPA pretraining, single-site and federated."""

__version__ = "0.1.0"
