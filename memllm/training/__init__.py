"""Training a memory: run config, data encoding, trainer loop, checkpoints, feature cache."""
