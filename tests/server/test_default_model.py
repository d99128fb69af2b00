"""The server's end-to-end tests again, on the built-in default model (built on first use).

The tests are the ones of test_api/test_serving, collected here with `server` and `tiny_model_dir`
overridden to the default model's server and directory.
"""
from __future__ import annotations

from typing import Iterator

import pytest

from tests.server.conftest import ServerProcess
from tests.server.test_api import (  # noqa: F401 - collected again with this module's fixtures
    test_chat_non_streaming_usage_matches_tokenizer, test_completions_string_and_list_prompt,
    test_disconnect_mid_stream_aborts_in_engine, test_n2_seeded_sampling_is_reproducible,
    test_openai_sdk_chat_stream_and_completion, test_stop_string_spanning_tokens_never_leaks,
    test_streaming_chat_shape_and_same_text_as_non_streaming)
from tests.server.test_serving import (  # noqa: F401
    test_concurrent_streams_each_get_their_solo_greedy_output,
    test_greedy_output_equals_moeserve_generate)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model_dir() -> str:
    from convert.default_model import ensure_default_model
    return ensure_default_model(progress=False)


@pytest.fixture(scope="module")
def concurrent_streams() -> int:
    """Ten: a full batch of 8 and two waiting (the tiny model's 16 over a batch of 4 cover the
    queue further; here each stream is the default model's time)."""
    return 10


@pytest.fixture(scope="module")
def server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # a 1024-token context keeps the fp32 KV cache of 8 sequences at 0.4 GB (4 GiB-context: 1.5 GB)
    # and half the experts resident saves 1.3 GB of fp32 slots (offloaded output is bit-identical
    # to resident), so the test run stays well under 6 GB with `moeserve generate` beside it.
    # fp32 for the server and the `moeserve generate` it is compared with: the concurrent-vs-solo test
    # needs batch-invariant greedy output, which bf16 (the default on this bf16 checkpoint) does not
    # give: its rounding depends on the batch shape, so near-ties flip late in long answers
    mp = pytest.MonkeyPatch()
    mp.setenv("MOESERVE_DTYPE", "fp32")
    srv = ServerProcess(tiny_model_dir, str(tmp_path_factory.mktemp("default") / "server.log"),
                        extra=("--max-batch", "8", "--context-length", "1024",
                               "--expert-budget", "50%"))
    try:
        srv.wait_ready(deadline_s=600)
        yield srv
    finally:
        srv.stop()
        mp.undo()
