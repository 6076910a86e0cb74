"""teefl: confidential federated learning, with the cost of every protection measured."""

__version__ = "0.1.0"
