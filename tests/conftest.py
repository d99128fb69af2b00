"""Test-wide settings, and the fixture several directories share."""
import os
from typing import Any

import pytest
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


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer() -> Any:
    """The packaged SmolLM2 GGUF's tokenizer as transformers reads it (GPT-2's split, before
    moeserve's), read once for the whole run (1-2 s a read here): a test that
    changes it works on a deep copy."""
    from transformers import PreTrainedTokenizerFast

    from convert.gguf_import import find_packaged_gguf
    folder, name = os.path.split(find_packaged_gguf())
    return PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)
