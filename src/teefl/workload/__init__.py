"""The machine-learning workload: models, datasets, partitions, local training.

Kept apart from the federation and security code so the measured overheads (TEE, TLS,
attestation) wrap one fixed, well-understood training job: the same model, data shard and
seeded schedule whichever protections are on. Submodules are imported explicitly
(``teefl.workload.models`` ...) so loading a plan does not pull in torchvision.
"""
