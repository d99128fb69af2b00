"""The peers of the end-to-end benchmark, each run inside bench.e2e_worker: transformers +
accelerate disk offload, and llama.cpp (llama-cpp-python) on a GGUF with its default mmap."""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable, Optional

from bench.e2e_worker import Probe, fast_enough, measure_sequential


def left_pad(prompts: list[list[int]], pad: int) -> tuple[Any, Any]:
    """(ids, attention mask) [B, T] of ``prompts`` left-padded with ``pad``, as generate expects."""
    import torch
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def run_accelerate(spec: dict[str, Any]) -> dict[str, Any]:
    """What a Hugging Face user does when the model does not fit: device_map="auto" with
    max_memory = the scenario's RAM for weights; the rest goes to disk (offload_folder), and
    accelerate's hooks load each offloaded module's weights per forward. Uncapped (no
    max_memory_bytes): everything in RAM, the compute floor of the offloaded run."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(spec["threads"])
    offload = spec.get("offload_dir")
    cap = spec.get("max_memory_bytes")
    kwargs: dict[str, Any] = {}
    if cap:
        shutil.rmtree(offload, ignore_errors=True)
        os.makedirs(offload)
        kwargs = dict(device_map="auto", max_memory={"cpu": int(cap)}, offload_folder=offload)
    try:
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.bfloat16, **kwargs).eval()
        on_disk = sum(1 for v in (getattr(model, "hf_device_map", None) or {}).values() if v == "disk")
        if cap and not on_disk:
            raise RuntimeError(f"accelerate placed nothing on disk under max_memory {cap}: "
                               "the comparison would not be offloaded")
        pad = model.generation_config.pad_token_id
        pad = pad if pad is not None else model.generation_config.eos_token_id
        pad = int(pad[0] if isinstance(pad, list) else pad)
        n = spec["max_tokens"]

        class Stamps(BaseStreamer):
            """generate() puts the prompt first, then each new token (batch-wide)."""

            def __init__(self, on_first: Callable[[], None]) -> None:
                self.times: list[float] = []
                self.calls = 0
                self.on_first = on_first

            def put(self, value: Any) -> None:
                self.calls += 1
                if self.calls > 1:
                    self.times.append(time.perf_counter())
                    if len(self.times) == 1:
                        self.on_first()

            def end(self) -> None:
                pass

        def generate(prompts: list[list[int]], streamer: Any = None) -> None:
            ids, mask = left_pad(prompts, pad)
            with torch.inference_mode():
                model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=pad, streamer=streamer)

        def one(ids: list[int], on_first: Callable[[], None]) -> list[float]:
            st = Stamps(on_first)
            generate([ids], st)
            return st.times

        probe = Probe()
        requests = measure_sequential(spec["prompts"], spec["slow_ms"], probe, one)
        concurrent = None
        if fast_enough(requests, spec):
            batch = spec["concurrent_prompts"]
            d0, start = probe()["disk"], time.perf_counter()
            generate(batch)                              # one padded batch: generate decodes it together
            concurrent = {"requests": len(batch), "tokens": len(batch) * n, "mode": "batched",
                          "seconds": time.perf_counter() - start, "disk_bytes": probe()["disk"] - d0}
        notes = (f"device_map placed {on_disk} modules on disk, max_memory cpu={cap / 1e9:.2f} GB"
                 if cap else "every weight in RAM (no device_map)")
        return {"requests": requests, "concurrent": concurrent, "notes": notes}
    finally:
        if offload:
            shutil.rmtree(offload, ignore_errors=True)


def run_llama_cpp(spec: dict[str, Any]) -> dict[str, Any]:
    """llama-cpp-python on a GGUF with its default mmap (the parent puts this process in a memory
    cgroup, so its page cache is capped too). Greedy (top_k=1), EOS ignored (generate() yields until
    told to stop) so every request makes the same number of tokens. The concurrent phase decodes the
    sequences together through llama.cpp's batch API (one llama_decode per step for all of them)."""
    import llama_cpp

    n = spec["max_tokens"]
    ctx = max(len(p) for p in spec["prompts"]) + n + 8
    llm = llama_cpp.Llama(spec["gguf"], n_ctx=ctx, n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], n_batch=512, verbose=False)

    tokens: list[list[int]] = []      # of the sequential phase: the batched phase must make the same

    def one(ids: list[int], on_first: Callable[[], None]) -> list[float]:
        stamps: list[float] = []
        tokens.append([])
        for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            tokens[-1].append(int(t))
            if len(stamps) == 1:
                on_first()
            if len(stamps) >= n:
                break
        return stamps

    probe = Probe()
    requests = measure_sequential(spec["prompts"], spec["slow_ms"], probe, one)
    concurrent, same = None, True
    if fast_enough(requests, spec):
        batch = spec["concurrent_prompts"]
        d0, start = probe()["disk"], time.perf_counter()
        made = decode_together(llama_cpp, llm, batch, n, spec["threads"])
        same = all(m == t for m, t in zip(made, tokens))
        concurrent = {"requests": len(batch), "tokens": sum(map(len, made)), "mode": "batched",
                      "seconds": time.perf_counter() - start, "disk_bytes": probe()["disk"] - d0}
    return {"requests": requests, "concurrent": concurrent,
            "notes": f"GGUF {os.path.basename(spec['gguf'])}, default mmap; batched phase tokens "
                     f"{'equal' if same else 'DIFFER from'} the sequential ones"}


def decode_together(llama_cpp: Any, llm: Any, prompts: list[list[int]], n: int,
                    threads: int, decode_start: Optional[list[float]] = None) -> list[list[int]]:
    """Greedy-decode ``n`` tokens for each prompt as parallel sequences of one llama.cpp context
    (its own multi-sequence batching, as llama-server's parallel slots do); the tokens of each.
    ``decode_start`` receives the time at which every prompt had its first token."""
    import numpy as np

    k = len(prompts)
    cp = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)   # the same settings
    cp.n_ctx = k * (max(len(p) for p in prompts) + n + 8)     # each sequence gets n_ctx / k
    cp.n_batch = cp.n_ubatch = max(512, max(len(p) for p in prompts))
    cp.n_seq_max = k
    cp.n_threads = cp.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(llm.model, cp)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed for the batched context")
    batch = llama_cpp.llama_batch_init(cp.n_batch, 0, k)
    n_vocab = llm.n_vocab()
    try:
        def submit(items: list[tuple[int, int, int, bool]]) -> None:
            batch.n_tokens = len(items)
            for j, (tok, pos, seq, want) in enumerate(items):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = tok, pos, 1
                batch.seq_id[j][0], batch.logits[j] = seq, want
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed in the batched phase")

        def argmax(j: int) -> int:
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, j), shape=(n_vocab,))
            return int(row.argmax())

        nxt: list[int] = []
        pos: list[int] = []
        for s, ids in enumerate(prompts):                    # each prompt pass, then decode all at once
            submit([(t, i, s, i == len(ids) - 1) for i, t in enumerate(ids)])
            nxt.append(argmax(len(ids) - 1))
            pos.append(len(ids))
        made = [[t] for t in nxt]
        if decode_start is not None:
            decode_start.append(time.perf_counter())
        for _ in range(n - 1):
            submit([(nxt[s], pos[s], s, True) for s in range(k)])
            nxt = [argmax(s) for s in range(k)]
            pos = [p + 1 for p in pos]
            for s in range(k):
                made[s].append(nxt[s])
        return made
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
