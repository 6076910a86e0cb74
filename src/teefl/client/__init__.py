"""The collaborator: its round loop, its session with the aggregator, its resident model."""
