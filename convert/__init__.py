"""Offline tooling: checkpoints in, checkpoints out (default-model build, quantization)."""
