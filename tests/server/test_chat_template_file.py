"""--chat-template FILE: a template used instead of the model's (a GGUF that carries none, or a
template to correct), checked when the server starts."""
from __future__ import annotations

from typing import Any, AsyncIterator

import pytest
from fastapi.testclient import TestClient

from configs import ServerConfig
from configs.base import ConfigError
from engine.protocol import GenerateRequest, ModelInfo, TokenDelta
from server.main import build_app
from server.tokenizer import TextTokenizer
from tests.server.test_harmony_scripted import ScriptedClient

TEMPLATE = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


class Recording(ScriptedClient):
    """Replies with the script and keeps every prompt the server sent."""

    def __init__(self, info: ModelInfo, script: list[int]) -> None:
        super().__init__(info, script)
        self.prompts: list[tuple[int, ...]] = []

    def submit(self, req: GenerateRequest) -> AsyncIterator[TokenDelta]:
        self.prompts.append(req.prompt_token_ids)
        return super().submit(req)


def test_the_file_replaces_the_models_template(tiny_model_dir: str, tmp_path: Any) -> None:
    path = tmp_path / "chat.jinja"
    path.write_text(TEMPLATE)
    tok = TextTokenizer(tiny_model_dir)
    assert tok.template_source and tok.template_source != TEMPLATE       # the model has its own
    client = Recording(ModelInfo("tiny", tiny_model_dir, "mixtral", 1024, tok.vocab_size, ()),
                       tok.encode("Hello.", add_special_tokens=False))
    app = build_app(ServerConfig(chat_template=str(path), served_model_name="tiny"), client, tiny_model_dir)
    with TestClient(app, base_url="http://127.0.0.1") as http:
        r = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "Hi there"}]})
    assert r.status_code == 200, r.text
    assert client.prompts == [tuple(tok.encode("[user]Hi there[assistant]", add_special_tokens=False))]


def test_a_missing_or_broken_file_is_refused_naming_it(tiny_model_dir: str, tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="chat_template.*no such file"):
        ServerConfig(chat_template=str(tmp_path / "none.jinja"))
    assert ServerConfig(chat_template=" ").chat_template is None        # an empty env var: the model's
    (tmp_path / "empty.jinja").write_text("")
    with pytest.raises(ConfigError, match="chat_template.*empty"):
        ServerConfig(chat_template=str(tmp_path / "empty.jinja"))
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(ValueError, match=r"bad\.jinja: the chat template does not compile \(line 1"):
        TextTokenizer(tiny_model_dir, str(bad))
