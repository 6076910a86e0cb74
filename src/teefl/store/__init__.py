"""What the aggregator keeps on disk so that a crash loses no round and counts nothing twice:
atomic writes, update files, checkpoints and the resume pointer, stored updates, start-up
clean-up, sealed files, shared-memory staging slots."""
