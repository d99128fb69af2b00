"""HTTP server configuration."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from configs.base import ConfigError

# --tool-parser (server/tools.py, server/harmony.py)
TOOL_PARSERS = ("auto", "hermes", "glm45", "qwen3_coder", "minimax_m2", "deepseek_v3", "deepseek_v31",
                "json", "harmony")
# --reasoning-parser (server/reasoning.py, server/harmony.py)
REASONING_PARSERS = ("auto", "think", "harmony", "none")

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServerConfig:
    """HTTP server: address, authentication, limits."""

    host: str = field(default="127.0.0.1", metadata={
        "help": "address to bind; 127.0.0.1 keeps the server private to this machine"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    api_key: Optional[str] = field(default=None, metadata={
        "help": "require the key ('Authorization: Bearer KEY' or 'x-api-key: KEY') on every "
                "route but /health", "metavar": "KEY"})
    served_model_name: Optional[str] = field(default=None, metadata={
        "help": "model id shown by /v1/models and accepted in requests; default: the model "
                "directory's name", "metavar": "NAME"})
    max_queue: int = field(default=64, metadata={
        "help": "most requests waiting for the engine; more are answered 429"})
    responses_store: int = field(default=100, metadata={
        "help": "Responses API: the last N stored responses kept in memory, for "
                "previous_response_id and GET /v1/responses/{id} (lost at restart); 0 keeps none"})
    max_request_bytes: int = field(default=4_000_000, metadata={
        "help": "largest accepted request body in bytes"})
    cors_origins: tuple[str, ...] = field(default=(), metadata={
        "help": "web origins allowed to use the API from a browser (CORS and the Origin check), "
                "e.g. https://app.example; '*' allows any. Default: pages served from loopback "
                "(http://localhost:*, http://127.0.0.1:*) and desktop apps (app://, file://, "
                "tauri://, vscode-webview://, vscode-file://) only. Space-separated on the CLI, "
                "comma-separated in the env"})
    allowed_hosts: tuple[str, ...] = field(default=(), metadata={
        "help": "extra names accepted in the Host header ('*' accepts any). The bound address, "
                "loopback names and IP literals are always accepted; other names are refused "
                "(403) against DNS rebinding"})
    shutdown_grace_s: float = field(default=10.0, metadata={
        "help": "seconds that open requests get to finish at shutdown (SIGTERM/Ctrl-C); streams "
                "still open then end with an error event", "flag": "--shutdown-grace",
        "metavar": "SECONDS"})
    generation_config: str = field(default="auto", metadata={
        "help": "'auto': the model's generation_config.json supplies the default temperature, "
                "top_p, top_k, min_p, repetition_penalty and max_new_tokens of requests that leave "
                "them out (as vLLM does); 'none': the OpenAI defaults (temperature 1, top_p 1)",
        "choices": ("auto", "none")})
    default_max_tokens: int = field(default=1024, metadata={
        "help": "most new tokens for a request that sets no max_tokens/max_completion_tokens "
                "(front ends such as Open WebUI send none); 0: up to the context's end",
        "metavar": "N"})
    tool_parser: str = field(default="auto", metadata={
        "help": "how tool calls are read from the model's output: 'hermes' (<tool_call>{json}"
                "</tool_call>, Hermes/Qwen style; a bare JSON call is read too), 'glm45' "
                "(GLM-4.5's <tool_call>name with <arg_key>/<arg_value> pairs; Hermes blocks too), "
                "'qwen3_coder' (Qwen3-Coder's <function=name> with <parameter=key> blocks; Hermes "
                "blocks too), 'minimax_m2' (MiniMax-M2's <minimax:tool_call> blocks of <invoke "
                "name=...> with <parameter name=...> values), 'deepseek_v3' (DeepSeek-V3/R1's "
                "<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME and ```json arguments), "
                "'deepseek_v31' (DeepSeek-V3.1's <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{json}), "
                "'json' (a bare JSON object or array), 'harmony' (gpt-oss: a commentary message "
                "to=functions.NAME with JSON arguments), or 'auto' (harmony for chat templates that "
                "write <|channel|>, deepseek_v3 for those that write <｜tool▁calls▁begin｜> and "
                "```json, deepseek_v31 for <｜tool▁calls▁begin｜> alone, minimax_m2, glm45 or "
                "qwen3_coder for those that write their tags, else hermes)",
        "choices": TOOL_PARSERS})
    reasoning_parser: str = field(default="auto", metadata={
        "help": "'think': a thinking model's reasoning (<think>...</think> at the start of a "
                "reply, or from its start when the chat template opened the block) is sent as "
                "reasoning_content, the rest as content, as vLLM and llama.cpp's server send it; "
                "'harmony': gpt-oss's analysis channel is reasoning_content, its final channel "
                "content; 'none': the whole reply is content (harmony's analysis too, without "
                "its tags); 'auto': harmony for chat templates that write <|channel|>, think for "
                "those that write </think> (Qwen3, GLM-4.5, DeepSeek-R1), else none. Harmony's "
                "one parser reads reasoning and tool calls together: either option naming it "
                "applies it to both",
        "choices": REASONING_PARSERS})
    chat_template: Optional[str] = field(default=None, metadata={
        "help": "a Jinja chat template file used instead of the model's: for a model that has "
                "none (a GGUF file without one, such as Ollama's GLM-4.7-Flash) or to correct one, "
                "as vLLM's --chat-template and llama.cpp's --chat-template-file", "metavar": "FILE"})
    sse_ping_s: float = field(default=15.0, metadata={
        "help": "seconds between SSE keep-alive comments on an open stream (proxies and clients "
                "drop idle connections)", "flag": "--sse-ping", "metavar": "SECONDS"})
    web_ui: bool = field(default=True, metadata={
        "help": "serve the built-in chat page, with its live expert view, at / (--no-web-ui: "
                "the API only)"})
    log_level: str = field(default="info", metadata={
        "help": "logging level", "choices": LOG_LEVELS})

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            object.__setattr__(self, "api_key", None)   # an empty env var means "no key"
        if not 0 < self.port < 65536:
            raise ConfigError("port", self.port, "must be in 1..65535")
        if not 0 <= self.responses_store <= 100_000:
            raise ConfigError("responses_store", self.responses_store, "must be between 0 and 100000")
        if self.max_queue < 1:
            raise ConfigError("max_queue", self.max_queue, "must be at least 1")
        if self.max_request_bytes < 1024:
            raise ConfigError("max_request_bytes", self.max_request_bytes, "must be at least 1024")
        if not 0.0 <= self.shutdown_grace_s <= 3600.0:
            raise ConfigError("shutdown_grace_s", self.shutdown_grace_s, "must be in [0, 3600]")
        if self.default_max_tokens < 0:
            raise ConfigError("default_max_tokens", self.default_max_tokens,
                              "must be >= 0 (0: no cap)")
        if not 0.1 <= self.sse_ping_s <= 3600.0:
            raise ConfigError("sse_ping_s", self.sse_ping_s, "must be in [0.1, 3600]")
        for name, choices in (("generation_config", ("auto", "none")),
                              ("tool_parser", TOOL_PARSERS),
                              ("reasoning_parser", REASONING_PARSERS)):
            if getattr(self, name) not in choices:
                raise ConfigError(name, getattr(self, name), f"expected one of {', '.join(choices)}")
        if not self.host:
            raise ConfigError("host", self.host, "must not be empty")
        if self.chat_template is not None:
            if not self.chat_template.strip():
                object.__setattr__(self, "chat_template", None)   # an empty env var means "the model's"
            elif not os.path.isfile(self.chat_template):
                raise ConfigError("chat_template", self.chat_template, "no such file")
            elif os.path.getsize(self.chat_template) == 0:
                raise ConfigError("chat_template", self.chat_template, "the file is empty")
        for origin in self.cors_origins:
            if origin != "*" and "://" not in origin:
                raise ConfigError("cors_origins", origin, "expected '*' or an origin such as "
                                  "https://app.example")
