"""What it costs: timing events and the environment each process ran in."""
