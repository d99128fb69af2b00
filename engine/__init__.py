"""The engine: token ids in, token ids out. Owns the compute device."""
