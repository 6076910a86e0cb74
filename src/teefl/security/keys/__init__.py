"""The model owner's key service (`teefl keys serve`) and a party's client of it: secrets
released only to parties whose TEE evidence verifies under the owner's policy (docs/security.md,
"Keys released only to attested parties")."""
