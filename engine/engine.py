"""The engine: token ids in, token ids out, one step at a time.

step() reads as schedule -> run -> postprocess: aborts are applied, waiting requests are admitted
into free KV-cache slots (continuous batching); then the oldest request still reading its prompt
gets one prompt pass of at most ``prefill_chunk`` tokens (first admitted, first answered), and
every request already decoding gets one token in one batched forward, so running streams keep
flowing while a long prompt is read (chunked prefill, as vLLM and llama.cpp's server do). A free
slot keeps its keys and values, and a request whose prompt starts with what a slot holds reads
only the rest (engine/slot_pool.py).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from cache.provider import ExpertProvider, StepRows
from cache.step_events import StepEvents
from engine.loader import LoadedModel
from engine.models.common import Batch, KVCache
from engine.protocol import (FINISH_ABORT, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, EngineStats,
                             GenerateRequest, ModelInfo, TokenDelta, TokenExperts)
from engine.constraints import GrammarCompiler
from engine.expert_view import merge, share
from engine.sampling import Choice, SamplerState, sample
from engine.slot_pool import SlotPool

log = logging.getLogger("moeserve.engine")
# a hybrid model's slot keeps a copy of its linear-attention state this many tokens before its
# prompt's end: a thinking template's next turn drops the reply and differs from this prompt in
# its last few tokens (the generation prompt, e.g. "<|im_start|>assistant\n<think>\n")
SAVE_MARGIN = 16


@dataclass
class Sequence:
    req: GenerateRequest
    sampler: SamplerState
    slot: int = -1
    in_kv: int = 0              # tokens (prompt, then output) whose keys and values the slot holds
    cached: int = 0             # prompt tokens found in the slot's cache on admission
    output: list[int] = field(default_factory=list)
    experts: Optional[TokenExperts] = None   # watched: the passes since the last token

    @property
    def id(self) -> str:
        return self.req.request_id

    @property
    def length(self) -> int:
        return len(self.req.prompt_token_ids) + len(self.output)

    def tokens_in_kv(self) -> tuple[int, ...]:
        return (tuple(self.req.prompt_token_ids) + tuple(self.output))[:self.in_kv]


class Engine:
    def __init__(self, loaded: LoadedModel, provider: ExpertProvider, max_batch: int = 8,
                 prefill_chunk: int = 256, prefix_cache: bool = True) -> None:
        self.model = loaded.model
        self.model_info: ModelInfo = loaded.info
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.provider = provider
        self.model.set_provider(provider)
        spec = self.model.kv_spec
        self.context = loaded.info.context_length
        self.kv = KVCache.for_model(spec, max_batch, self.context, loaded.dtype, loaded.device,
                                    saved_states=prefix_cache)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        # a linear-attention state cannot go back to an earlier position, but to its saved copy
        # (slot_pool.py, linear_state.py)
        linear = self.kv.linear
        self.slots = SlotPool(max_batch, prefix_cache, whole_prefix_only=linear is not None,
                              saved=None if linear is None else linear.saved_at.__getitem__)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.pending_aborts: list[str] = []
        self.eos = frozenset(loaded.info.eos_token_ids)
        self.grammars = GrammarCompiler(loaded.info.path, loaded.info.vocab_size,
                                        loaded.info.eos_token_ids)
        self.counters = dict(requests_finished=0, requests_aborted=0, requests_failed=0,
                             prompt_tokens=0, prompt_tokens_cached=0, generated_tokens=0, steps=0)
        log.info("engine ready: %s (%s) on %s, context %d, batch %d, KV cache %.1f MiB",
                 loaded.info.name, loaded.info.model_type, loaded.device, self.context, max_batch,
                 self.kv.nbytes / 2**20)

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, req: GenerateRequest) -> None:
        """Queue a request; raises ValueError with a message for the client if it cannot run."""
        ids = req.prompt_token_ids
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.context:
            raise ValueError(f"the prompt has {len(ids)} tokens but the context holds "
                             f"{self.context}, leaving no room for a reply")
        vocab = self.model_info.vocab_size
        bad = next((t for t in ids if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        bad = next((t for t, _ in req.sampling.logit_bias if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if any(s.id == req.request_id for s in (*self.waiting, *self.running)):
            raise ValueError(f"request id {req.request_id!r} is already in use")
        state = SamplerState(req.sampling, tuple(ids))
        if req.sampling.constraint is not None:   # compiled on arrival; ValueError: a 400
            state.grammar = self.grammars.matcher(req.sampling.constraint)
        self.waiting.append(Sequence(req, state))

    def abort(self, request_id: str) -> None:
        self.pending_aborts.append(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.pending_aborts)

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> list[TokenDelta]:
        out = self._apply_aborts()
        while self.waiting and len(self.slots):
            self._admit(self.waiting.popleft())
        # decoders are chosen before the prompt pass, so a request whose prompt ends now gets
        # its first token from that pass and its second from the next step
        decoding = [s for s in self.running if s.output]
        reading = next((s for s in self.running if not s.output), None)
        if reading is not None:
            out += self._run([reading], prefill=True)
        if decoding:
            out += self._run(decoding, prefill=False)
        return out

    def _admit(self, seq: Sequence) -> None:
        """Give ``seq`` a slot, and the prompt tokens that slot already holds."""
        seq.slot, seq.cached = self.slots.acquire(seq.req.prompt_token_ids)
        linear = self.kv.linear
        if linear is not None:
            if seq.cached and seq.cached != linear.reached[seq.slot]:
                if seq.cached == linear.saved_at[seq.slot]:
                    linear.restore(seq.slot)            # back to the copy the pool chose
                else:                                   # never expected: read it all
                    log.warning("slot %d: no linear state at %d; the prompt is read whole",
                                seq.slot, seq.cached)
                    seq.cached = 0
            linear.forget(seq.slot, seq.cached)
        seq.in_kv = seq.cached
        if seq.cached:
            log.debug("request %s: %d of %d prompt tokens reused from slot %d", seq.id,
                      seq.cached, len(seq.req.prompt_token_ids), seq.slot)
        self.running.append(seq)

    def _apply_aborts(self) -> list[TokenDelta]:
        out = []
        for rid in self.pending_aborts:
            seq = next((s for s in (*self.waiting, *self.running) if s.id == rid), None)
            if seq is None:
                continue
            if seq in self.waiting:
                self.waiting.remove(seq)
            self._finish(seq, aborted=True)
            self.counters["requests_aborted"] += 1
            out.append(self._delta(seq, (), None, FINISH_ABORT))
        self.pending_aborts.clear()
        return out

    @torch.inference_mode()
    def _run(self, seqs: list[Sequence], prefill: bool) -> list[TokenDelta]:
        """One forward over ``seqs`` (one chunk of one prompt, or one decode token each) and
        sampling (none after a chunk that does not end its prompt)."""
        dev = self.device
        save_at = -1
        if prefill:
            (seq,) = seqs
            start = seq.in_kv
            end = start + self.prefill_chunk
            n_prompt = len(seq.req.prompt_token_ids)
            # saved only where the pool would reuse it: half of the prompt at least (slot_pool.py)
            if self.kv.linear is not None and self.kv.linear.saves and n_prompt >= 2 * SAVE_MARGIN:
                save_at = n_prompt - SAVE_MARGIN
                end = save_at if start < save_at < end else end   # a pass ends where it saves
            chunk = seq.req.prompt_token_ids[start:end]
            ids = torch.tensor([chunk], dtype=torch.long, device=dev)
            pos = torch.arange(start, start + len(chunk), device=dev)[None]
            n_tokens = [len(chunk)]
        else:
            start = 0
            ids = torch.tensor([[s.output[-1]] for s in seqs], dtype=torch.long, device=dev)
            pos = torch.tensor([[s.length - 1] for s in seqs], dtype=torch.long, device=dev)
            n_tokens = [1] * len(seqs)
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=dev)
        one = len(seqs) == 1
        kv_len = start + n_tokens[0] if prefill else max(s.length for s in seqs)   # no device sync
        batch = Batch(pos, slots, kv_len, seqs[0].slot if one else None,
                      (start if prefill else seqs[0].length - 1) if one else None,
                      None if prefill else tuple((s.slot, s.length) for s in seqs))
        rows = StepRows(tuple(s.id for s in seqs), tuple(n_tokens), (prefill,) * len(seqs))
        watched = frozenset(s.id for s in seqs if s.req.watch_experts)
        self.provider.begin_step(rows, StepEvents(rows, watched, self.model_info.num_moe_layers)
                                 if watched else None)
        try:
            try:
                logits = self.model(ids, batch, self.kv)                  # [B, V]
            finally:
                events = self.provider.end_step()
            if events is not None:
                for s in seqs:
                    if s.id in watched:
                        s.experts = merge(s.experts, share(events, s.id,
                                                           "prompt" if prefill else "decode"))
            partial = prefill and start + n_tokens[0] < len(seqs[0].req.prompt_token_ids)
            choices = [] if partial else sample(logits, [s.sampler for s in seqs])
        except Exception as e:  # a failed forward fails its requests, not the engine
            log.exception("forward pass failed for %s", [s.id for s in seqs])
            for s in seqs:   # the pass may have left the slots' states half-written
                self._finish(s, aborted=True, kv_valid=False)
            self.counters["requests_failed"] += len(seqs)
            return [self._delta(s, (), None, FINISH_ERROR, error=f"{type(e).__name__}: {e}")
                    for s in seqs]
        self.counters["steps"] += 1
        for s, n in zip(seqs, n_tokens):
            s.in_kv += n
        if prefill:
            if start + n_tokens[0] == save_at:
                self.kv.linear.save(seqs[0].slot)       # type: ignore[union-attr]
            self.counters["prompt_tokens"] += n_tokens[0]
            if start == seqs[0].cached:      # its first pass: the rest was found cached
                self.counters["prompt_tokens_cached"] += start
        return [self._postprocess(s, c) if c.error is None else self._fail_alone(s, c.error)
                for s, c in zip(seqs, choices)]

    def _fail_alone(self, seq: Sequence, why: str) -> TokenDelta:
        """One request's logits could not be sampled: it ends with an error, the batch goes on."""
        log.warning("request %s failed: %s", seq.id, why)
        self._finish(seq, aborted=True)
        self.counters["requests_failed"] += 1
        return self._delta(seq, (), None, FINISH_ERROR, error=why)

    def _postprocess(self, seq: Sequence, choice: Choice) -> TokenDelta:
        seq.output.append(choice.token)
        seq.sampler.note(choice.token)
        self.counters["generated_tokens"] += 1
        grammar = seq.sampler.grammar
        if grammar is not None and grammar.error is not None:
            return self._fail_alone(seq, grammar.error)
        p = seq.req.sampling
        reason: Optional[str] = None
        if (choice.token in self.eos and not p.ignore_eos) or choice.token in p.stop_token_ids \
                or (grammar is not None and grammar.finished):
            reason = FINISH_STOP
        elif len(seq.output) >= p.max_tokens or seq.length >= self.context:
            reason = FINISH_LENGTH
        if reason is not None:
            self._finish(seq, aborted=False)
            self.counters["requests_finished"] += 1
        return self._delta(seq, (choice.token,), choice, reason)

    def _finish(self, seq: Sequence, aborted: bool, kv_valid: bool = True) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot >= 0:
            if not kv_valid and self.kv.linear is not None:
                self.kv.linear.forget(seq.slot, 0)
            self.slots.release(seq.slot, seq.tokens_in_kv() if kv_valid else (),
                               len(seq.req.prompt_token_ids))
            seq.slot = -1
            self.provider.end_request(seq.id, aborted=aborted)

    def _delta(self, seq: Sequence, tokens: tuple[int, ...], choice: Optional[Choice],
               reason: Optional[str], error: Optional[str] = None) -> TokenDelta:
        lp = (choice.logprob,) if choice is not None and choice.logprob is not None else None
        top = (choice.top,) if choice is not None and choice.top is not None else None
        experts, seq.experts = (seq.experts, None) if tokens else (None, seq.experts)
        return TokenDelta(seq.id, tokens, lp, top, finished=reason is not None, finish_reason=reason,
                          error=error, prompt_tokens=len(seq.req.prompt_token_ids),
                          completion_tokens=len(seq.output), cached_tokens=seq.cached,
                          experts=experts)

    # -- introspection ----------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.running), waiting=len(self.waiting),
                           cache=dict(self.provider.stats()),
                           cache_layers=dict(self.provider.layer_stats()), **self.counters)

    def close(self) -> None:
        self.provider.close()


@dataclass
class Result:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: list[int]
    finish_reason: Optional[str]
    logprobs: list[float]
    seconds: float
    first_token_seconds: float


def run_to_completion(engine: Engine, requests: list[GenerateRequest]) -> dict[str, Result]:
    """Submit ``requests`` together and step until all finish (CLI, tests, benchmarks)."""
    start = time.perf_counter()
    results = {r.request_id: Result(r.request_id, r.prompt_token_ids, [], None, [], 0.0, 0.0)
               for r in requests}
    for r in requests:
        engine.add_request(r)
    pending = set(results)
    while pending:
        for d in engine.step():
            res = results[d.request_id]
            if d.token_ids and not res.token_ids:
                res.first_token_seconds = time.perf_counter() - start
            res.token_ids.extend(d.token_ids)
            res.logprobs.extend(d.logprobs or ())
            if d.finished:
                if d.error:
                    raise RuntimeError(f"request {d.request_id} failed: {d.error}")
                res.finish_reason = d.finish_reason
                res.seconds = time.perf_counter() - start
                pending.discard(d.request_id)
    return results
