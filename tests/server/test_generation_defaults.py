"""Default sampling parameters: generation_config.json applies to requests that leave a value
out, the request's own value wins, --generation-config none turns it off, and
--default-max-tokens caps requests that set no limit."""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

import httpx
import pytest

from server.defaults import GenerationDefaults, load_generation_defaults
from tests.server.conftest import ServerProcess

ASK = [{"role": "user", "content": "Say something."}]


def write_config(folder: str, values: dict[str, Any]) -> None:
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(values, f)


def test_values_are_read_and_checked(tmp_path: Any) -> None:
    write_config(str(tmp_path), {"do_sample": True, "temperature": 0.3, "top_k": 20,
                                 "top_p": None, "max_new_tokens": 64, "bos_token_id": 1,
                                 "repetition_penalty": True})
    d = load_generation_defaults(str(tmp_path), fallback={"top_p": 0.9, "temperature": 0.8})
    assert d == GenerationDefaults(temperature=0.3, top_p=0.9, top_k=20, max_new_tokens=64)
    assert load_generation_defaults(str(tmp_path), "none") == GenerationDefaults()
    assert load_generation_defaults(str(tmp_path / "missing")) == GenerationDefaults()
    write_config(str(tmp_path), {"temperature": 7.0})
    with pytest.raises(ValueError, match="temperature"):
        load_generation_defaults(str(tmp_path))


def test_the_builtin_preset_carries_measured_defaults() -> None:
    from configs.presets import load_preset
    gen = load_preset("smollm2-moe-8x")["generation"]
    assert GenerationDefaults.from_mapping(gen).as_dict() == gen


@pytest.fixture(scope="module")
def model_copy(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with a generation_config.json asking for greedy 5-token replies."""
    folder = str(tmp_path_factory.mktemp("gen-defaults"))
    for name in os.listdir(tiny_model_dir):
        if name != "generation_config.json":
            os.symlink(os.path.join(tiny_model_dir, name), os.path.join(folder, name))
    write_config(folder, {"temperature": 0.0, "max_new_tokens": 5, "do_sample": True})
    return folder


def serve(folder: str, log: str, *extra: str) -> Iterator[ServerProcess]:
    with ServerProcess(folder, log, extra=extra) as srv:
        yield srv


@pytest.fixture(scope="module")
def auto_server(model_copy: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serve(model_copy, str(tmp_path_factory.mktemp("auto") / "server.log"))


@pytest.fixture(scope="module")
def none_server(model_copy: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serve(model_copy, str(tmp_path_factory.mktemp("none") / "server.log"),
                     "--generation-config", "none", "--default-max-tokens", "7")


def reply(srv: ServerProcess, **body: Any) -> dict[str, Any]:
    r = httpx.post(srv.base + "/v1/chat/completions", timeout=120,
                   json={"messages": ASK, "ignore_eos": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_model_defaults_apply_when_the_request_leaves_them_out(auto_server: ServerProcess) -> None:
    a, b = reply(auto_server), reply(auto_server)
    assert a["usage"]["completion_tokens"] == 5   # max_new_tokens
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]  # greedy


def test_the_request_overrides_the_model_defaults(auto_server: ServerProcess) -> None:
    assert reply(auto_server, max_tokens=3)["usage"]["completion_tokens"] == 3
    texts = {reply(auto_server, temperature=1.0, seed=s)["choices"][0]["message"]["content"]
             for s in range(3)}
    assert len(texts) == 3   # sampled, not greedy
    comp = httpx.post(auto_server.base + "/v1/completions", timeout=120,
                      json={"prompt": "Once", "ignore_eos": True}).json()
    assert comp["usage"]["completion_tokens"] == 5   # /v1/completions gets the defaults too


def test_generation_config_none_and_default_max_tokens(none_server: ServerProcess) -> None:
    texts = [reply(none_server) for _ in range(3)]
    assert all(t["usage"]["completion_tokens"] == 7 for t in texts)   # --default-max-tokens
    assert len({t["choices"][0]["message"]["content"] for t in texts}) == 3   # temperature 1
    assert reply(none_server, max_tokens=20)["usage"]["completion_tokens"] == 20


def test_the_build_writes_the_preset_defaults(tmp_path: Any) -> None:
    from convert.default_model import write_generation_config
    write_config(str(tmp_path), {"bos_token_id": 1, "do_sample": False})
    out = str(tmp_path / "out.json")
    write_generation_config(str(tmp_path / "generation_config.json"), out,
                            {"temperature": 0.4, "top_p": 0.9})
    with open(out, encoding="utf-8") as f:
        assert json.load(f) == {"bos_token_id": 1, "do_sample": True, "temperature": 0.4,
                                "top_p": 0.9}
