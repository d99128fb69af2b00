"""Per-request expert activation tracing, and moe-trace files (see ARCHITECTURE.md).

``ActivationTracer`` implements the ``Tracer`` protocol of cache/provider.py: the engine describes
each forward pass's rows (``begin_step``), every MoE layer reports its [T, k] routing
(``record``) and, where the provider computes it, its look-ahead (``record_lookahead``), and a
finished request is finalised with ``end_request``: its prompt and decode activation matrices,
its per-token routing, and (when a record path is given) one appended line of a moe-trace JSONL
file. A request's data is dropped once finalised, so memory stays bounded by the requests in
flight.

moe-trace v2 is v1 (ARCHITECTURE.md) with ``"version": 2``, an optional header field
``"expert_bytes"`` (bytes of one routed expert as the cache holds it, for the replay's time
model) and an optional request field ``"lookahead"``: ``lookahead[t][l]`` (l < L - 1) lists the
top-k experts of MoE layer l + 1's router applied to layer l's input hidden state for token t,
which is what the engine's cache sees one layer early (an empty list where it was not
computed); ``len(lookahead[t]) == L - 1``. v1 files load unchanged (no look-ahead).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from cache.routing import Routed, StepRows, split_routing

log = logging.getLogger("moeserve.cache")

TRACE_FORMAT = "moe-trace"
TRACE_VERSION = 2
READ_VERSIONS = (1, 2)


class TraceFormatError(ValueError):
    """A moe-trace file is malformed; the message names the file, line and field."""


@dataclass
class RequestTrace:
    """One request's routing: tokens[t][l] lists the experts layer l chose for token t; the
    first ``prefill`` tokens were prompt passes. Matrices are [L, E] token counts."""

    id: str
    prefill: int
    tokens: list[list[list[int]]]
    prompt_matrix: np.ndarray
    decode_matrix: np.ndarray
    aborted: bool = False
    lookahead: Optional[list[list[list[int]]]] = None   # [T][L-1][k], v2

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "prefill": self.prefill, "tokens": self.tokens}
        if self.lookahead is not None:
            out["lookahead"] = self.lookahead
        return out


@dataclass
class _Live:
    prompt: np.ndarray
    decode: np.ndarray
    tokens: list[list[list[int]]] = field(default_factory=list)
    ahead: list[list[list[int]]] = field(default_factory=list)   # [T][L-1] look-ahead top-k
    prefill: int = 0


def _as_rows(topk_ids: Any) -> list[list[int]]:
    rows = topk_ids.tolist() if hasattr(topk_ids, "tolist") else topk_ids
    return [[int(e) for e in r] for r in rows]


class ActivationTracer:
    """Records each request's expert activations; optionally appends finished ones to a file."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int,
                 record_path: Optional[str] = None, model: str = "", note: str = "",
                 expert_bytes: Optional[int] = None) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.record_path = record_path
        self._header: dict[str, Any] = {
            "format": TRACE_FORMAT, "version": TRACE_VERSION, "model": model,
            "num_layers": num_layers, "num_experts": num_experts, "top_k": top_k, "note": note}
        if expert_bytes:
            self._header["expert_bytes"] = int(expert_bytes)
        self._write_lookahead = True
        self._live: dict[str, _Live] = {}
        # the current step: (seq_id, first row, row count, prompt?, first token index)
        self._spans: list[tuple[str, int, int, bool, int]] = []
        self._step: Optional[StepRows] = None
        self._rows = 0
        if record_path is not None:
            self._check_existing(record_path)

    def _check_existing(self, path: str) -> None:
        """Appending to a trace of another model would corrupt it: refuse early and clearly."""
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            return
        with open(path, "r") as f:
            first = f.readline()
        header = _parse_header(first, path)
        for key in ("num_layers", "num_experts", "top_k"):
            if header[key] != self._header[key]:
                raise TraceFormatError(f"{path}: cannot append, header {key}={header[key]} but "
                                       f"this model has {key}={self._header[key]}")
        # appending to a v1 file keeps it v1: requests without look-ahead
        self._write_lookahead = header["version"] >= 2

    def begin_step(self, rows: StepRows) -> None:
        """The rows of the next forward pass: sequence i owns the next num_tokens[i] rows."""
        if not len(rows.seq_ids) == len(rows.num_tokens) == len(rows.prefill):
            raise ValueError(f"StepRows fields differ in length: {len(rows.seq_ids)} seq_ids, "
                             f"{len(rows.num_tokens)} num_tokens, {len(rows.prefill)} prefill")
        self._spans = []
        self._step = rows
        start = 0
        L = self.num_layers
        for sid, n, pre in zip(rows.seq_ids, rows.num_tokens, rows.prefill):
            live = self._live.get(sid)
            if live is None:
                live = self._live[sid] = _Live(np.zeros((L, self.num_experts), dtype=np.int64),
                                               np.zeros((L, self.num_experts), dtype=np.int64))
            first_tok = len(live.tokens)
            live.tokens.extend([[] for _ in range(L)] for _ in range(n))
            live.ahead.extend([[] for _ in range(L - 1)] for _ in range(n))
            if pre:
                live.prefill += n
            self._spans.append((sid, start, n, bool(pre), first_tok))
            start += n
        self._rows = start

    def record(self, layer: int, topk_ids: Any) -> Routed:
        """topk_ids: [T, k] (tensor or nested list) for MoE layer ``layer`` of this step.
        Returns the routing per request (the experts its tokens chose, repeats included, and
        which requests are in a prompt pass): the split the policy gets too."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"record: layer {layer} outside 0..{self.num_layers - 1}")
        rows = _as_rows(topk_ids)
        if len(rows) != self._rows:
            raise ValueError(f"record: layer {layer} routed {len(rows)} rows but the step "
                             f"declared {self._rows} (begin_step missing or stale?)")
        routed = split_routing(self._step, rows)
        if len(self._spans) != len(routed):     # a request ended mid-step: not routed any more
            live = {sp[0] for sp in self._spans}
            routed = Routed(((s, e) for s, e in routed.items() if s in live), routed.prompt & live)
        for sid, start, n, pre, first_tok in self._spans:
            live = self._live[sid]
            for r in range(n):
                live.tokens[first_tok + r][layer] = rows[start + r]
            mat = live.prompt if pre else live.decode
            np.add.at(mat[layer], np.asarray(routed[sid], dtype=np.int64), 1)
        return routed

    def record_lookahead(self, layer: int, topk_ids: Any) -> None:
        """topk_ids: [T, k], layer ``layer + 1``'s router applied to layer ``layer``'s input,
        for this step's rows (moe-trace v2 ``lookahead``)."""
        if not 0 <= layer < self.num_layers - 1:
            raise ValueError(f"record_lookahead: layer {layer} outside 0..{self.num_layers - 2}")
        rows = _as_rows(topk_ids)
        if len(rows) != self._rows:
            raise ValueError(f"record_lookahead: layer {layer} has {len(rows)} rows but the "
                             f"step declared {self._rows}")
        for sid, start, n, _, first_tok in self._spans:
            ahead = self._live[sid].ahead
            for r in range(n):
                ahead[first_tok + r][layer] = rows[start + r]

    def end_request(self, seq_id: str, aborted: bool = False) -> Optional[RequestTrace]:
        """Finalise ``seq_id``: returns its trace (None if it never ran) and appends it to the
        record file. Tokens whose routing is incomplete (an aborted pass) are dropped."""
        live = self._live.pop(seq_id, None)
        self._spans = [s for s in self._spans if s[0] != seq_id]
        if live is None:
            return None
        whole = [i for i, t in enumerate(live.tokens) if all(t)]
        complete = [live.tokens[i] for i in whole]
        prefill = min(live.prefill, sum(1 for t in live.tokens[:live.prefill] if all(t)))
        ahead = [live.ahead[i] for i in whole]
        has_ahead = self._write_lookahead and any(any(a) for a in ahead)
        trace = RequestTrace(seq_id, prefill, complete, live.prompt, live.decode, aborted,
                             ahead if has_ahead else None)
        if self.record_path is not None and complete:
            self._append(trace)
        return trace

    def in_flight(self) -> int:
        """Requests being traced right now."""
        return len(self._live)

    def _append(self, trace: RequestTrace) -> None:
        assert self.record_path is not None
        new = not os.path.exists(self.record_path) or os.path.getsize(self.record_path) == 0
        text = json.dumps(trace.to_json(), separators=(",", ":")) + "\n"
        if new:
            text = json.dumps(self._header) + "\n" + text
        # one write of whole lines then flush: a reader never sees half a request. A failed
        # write (disk full) is cut back to the last whole line and logged: serving goes on.
        try:
            with open(self.record_path, "a") as f:
                size = f.tell()
                try:
                    f.write(text)
                    f.flush()
                except OSError:
                    f.truncate(size)
                    raise
        except OSError as exc:
            log.warning("could not record request %s in %s: %s", trace.id, self.record_path, exc)


def _parse_header(line: str, path: str) -> dict[str, Any]:
    try:
        header = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceFormatError(f"{path}:1: header is not JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != TRACE_FORMAT:
        raise TraceFormatError(f"{path}:1: not a {TRACE_FORMAT} header")
    if header.get("version") not in READ_VERSIONS:
        raise TraceFormatError(f"{path}:1: version {header.get('version')!r} is not supported "
                               f"(expected one of {', '.join(map(str, READ_VERSIONS))})")
    eb = header.get("expert_bytes")
    if eb is not None and (not isinstance(eb, int) or eb < 1):
        raise TraceFormatError(f"{path}:1: header field 'expert_bytes' must be a positive "
                               f"integer, got {eb!r}")
    for key in ("num_layers", "num_experts", "top_k"):
        if not isinstance(header.get(key), int) or header[key] < 1:
            raise TraceFormatError(f"{path}:1: header field {key!r} must be a positive integer, "
                                   f"got {header.get(key)!r}")
    return header


def load_trace(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a moe-trace v1 or v2 file: (header, requests), each request {"id", "prefill",
    "tokens"} (and "lookahead" when the v2 file has it) with every token routed on every layer
    to valid expert ids. Raises TraceFormatError."""
    try:
        f = open(path, "r")
    except OSError as exc:
        raise TraceFormatError(f"{path}: cannot open trace ({exc.strerror})") from None
    with f:
        first = f.readline()
        if not first.strip():
            raise TraceFormatError(f"{path}: empty file, expected a {TRACE_FORMAT} header")
        header = _parse_header(first, path)
        L, E = header["num_layers"], header["num_experts"]
        requests = []
        for n, line in enumerate(f, start=2):
            if not line.strip():
                continue
            try:
                req = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceFormatError(f"{path}:{n}: request line is not JSON ({exc})") from None
            requests.append(_check_request(req, L, E, f"{path}:{n}", header["version"]))
    return header, requests


def _check_request(req: Any, L: int, E: int, where: str, version: int = 1) -> dict[str, Any]:
    if not isinstance(req, dict):
        raise TraceFormatError(f"{where}: a request must be an object")
    for key in ("id", "prefill", "tokens"):
        if key not in req:
            raise TraceFormatError(f"{where}: request lacks field {key!r}")
    tokens = req["tokens"]
    if not isinstance(tokens, list):
        raise TraceFormatError(f"{where}: 'tokens' must be a list")
    if not isinstance(req["prefill"], int) or not 0 <= req["prefill"] <= len(tokens):
        raise TraceFormatError(f"{where}: 'prefill' {req['prefill']!r} must be in 0..{len(tokens)}")
    for t, tok in enumerate(tokens):
        if not isinstance(tok, list) or len(tok) != L:
            raise TraceFormatError(f"{where}: tokens[{t}] must list {L} layers")
        for layer, experts in enumerate(tok):
            if (not isinstance(experts, list) or not experts
                    or not all(isinstance(e, int) and 0 <= e < E for e in experts)):
                raise TraceFormatError(f"{where}: tokens[{t}][{layer}] must be a non-empty list of "
                                       f"expert ids in 0..{E - 1}, got {experts!r}")
    out = {"id": str(req["id"]), "prefill": req["prefill"], "tokens": tokens}
    ahead = req.get("lookahead")
    if ahead is not None and version >= 2:
        if not isinstance(ahead, list) or len(ahead) != len(tokens):
            raise TraceFormatError(f"{where}: 'lookahead' must list one entry per token "
                                   f"({len(tokens)})")
        for t, tok in enumerate(ahead):
            if not isinstance(tok, list) or len(tok) != L - 1:
                raise TraceFormatError(f"{where}: lookahead[{t}] must list {L - 1} layers")
            for layer, experts in enumerate(tok):
                if (not isinstance(experts, list)
                        or not all(isinstance(e, int) and 0 <= e < E for e in experts)):
                    raise TraceFormatError(f"{where}: lookahead[{t}][{layer}] must be a list of "
                                           f"expert ids in 0..{E - 1}, got {experts!r}")
        out["lookahead"] = ahead
    return out
