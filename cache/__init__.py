"""Routed experts across disk <-> host <-> device. Knows nothing of requests, HTTP or tokenizers."""
