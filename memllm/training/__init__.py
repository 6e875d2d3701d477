"""Training a memory: run config, data encoding, lr schedule, the trainer loop, checkpoints,
feature cache, and auxiliary heads as trainer plug-ins (the supporting-fact head)."""
