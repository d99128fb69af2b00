"""Test-wide settings."""
import torch

# One compute thread: the tests are many small matrix products, for which OpenMP threads mostly
# spin-wait (several times slower on a shared 2-core machine). Results do not depend on it:
# exactness tests compare runs made in the same process.
torch.set_num_threads(1)
