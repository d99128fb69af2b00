"""Test-wide settings."""
import torch

# One compute thread: the tests are many small matrix products, for which OpenMP threads mostly
# spin-wait (several times slower on a shared 2-core machine). Results do not depend on it:
# exactness tests compare runs made in the same process.
torch.set_num_threads(1)

# Large tensors straight from mmap, so the memory of a model a test module frees goes back to the
# OS: with glibc's sliding threshold, freed multi-MB expert tensors raised it and later models were
# carved from the heap, which never shrank (the suite's RSS crept to ~8 GB; the limit is 6 GB).
try:
    import ctypes
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)     # M_MMAP_THRESHOLD = 1 MiB (fixed)
except (OSError, AttributeError):                    # not glibc: nothing to tune
    pass
