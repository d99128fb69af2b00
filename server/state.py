"""What every route shares: config, engine client, tokenizer, metrics, the shutdown signal, and
tokenization off the event loop."""
from __future__ import annotations

import asyncio
import datetime
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from configs import ServerConfig
from engine.client import EngineClient
from server.defaults import GenerationDefaults
from server.errors import APIError, bad_request
from server.metrics import Metrics
from server.ollama_items import same_model
from server.responses_store import ResponseStore
from server.tokenizer import TemplateError, TextTokenizer


@dataclass
class ServerState:
    cfg: ServerConfig
    client: EngineClient
    tokenizer: TextTokenizer
    model_name: str
    metrics: Metrics = field(default_factory=Metrics)
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    created: int = field(default_factory=lambda: int(time.time()))
    # set when shutdown begins: open streams end with an error event instead of being cut
    shutting_down: asyncio.Event = field(default_factory=asyncio.Event)
    live: set[Any] = field(default_factory=set)   # open Generations (server.generate)
    responses: ResponseStore = field(init=False)  # the Responses API's stored responses

    def __post_init__(self) -> None:
        self.responses = ResponseStore(self.cfg.responses_store)

    def begin_shutdown(self, error: BaseException) -> None:
        """Shutdown started: every open generation ends now with ``error`` (an SSE error event)
        rather than being cut when the graceful-shutdown timeout expires."""
        self.shutting_down.set()
        for gen in list(self.live):
            gen.fail(error)

    def model_card(self) -> dict[str, Any]:
        # OpenAI's fields, and Anthropic's (type, display_name, created_at), so that both SDKs'
        # models.list() and retrieve read it
        when = datetime.datetime.fromtimestamp(self.created, datetime.timezone.utc)
        card: dict[str, Any] = {"id": self.model_name, "object": "model", "created": self.created,
                                "owned_by": "moeserve", "type": "model",
                                "display_name": self.model_name,
                                "created_at": when.isoformat().replace("+00:00", "Z")}
        if self.client.ready:   # the shape the expert stream's entries have (the chat page's grid)
            info = self.client.model_info
            card["moeserve"] = {"model_type": info.model_type, "context_length": info.context_length,
                                "moe_layers": info.num_moe_layers, "experts": info.num_experts,
                                "top_k": info.top_k}
        return card

    def check_model(self, requested: str | None) -> None:
        if requested and not same_model(requested, self.model_name):
            raise APIError(404, f"The model '{requested}' does not exist; this server serves "
                                f"'{self.model_name}'", param="model", code="model_not_found")

    def require_ready(self) -> None:
        """A 503 (with Retry-After) while the engine starts."""
        if not self.client.ready:
            raise APIError(503, "the engine is starting; retry shortly", retry_after=5,
                           code="engine_loading")

    @property
    def context(self) -> int:
        self.require_ready()
        return self.client.model_info.context_length

    def _check_chars(self, n_chars: int, param: str) -> None:
        most = self.context * self.tokenizer.max_token_chars
        if n_chars > most:
            raise bad_request(f"the prompt has {n_chars} characters, more than the model's "
                              f"context of {self.context} tokens can ever hold", param)

    async def encode(self, text: str, param: str = "prompt") -> list[int]:
        """Token ids of ``text``, on a worker thread; hopeless sizes rejected before tokenizing."""
        self._check_chars(len(text), param)
        return await asyncio.to_thread(self.tokenizer.encode, text)

    async def encode_chat(self, messages: list[dict[str, Any]],
                          variables: Optional[dict[str, Any]] = None, prefill: str = "") -> list[int]:
        self._check_chars(sum(len(m.get("content") or "") for m in messages) + len(prefill),
                          "messages")
        try:
            return await asyncio.to_thread(self.tokenizer.encode_chat, messages, variables, prefill)
        except (TemplateError, TypeError) as exc:   # TypeError: a template choking on a value
            raise bad_request(str(exc), "messages") from None
