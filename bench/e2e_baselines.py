"""The two baselines of the end-to-end benchmark, each run inside bench.e2e_worker:
transformers + accelerate disk offload, and llama.cpp (llama-cpp-python) on a GGUF with mmap."""
from __future__ import annotations

import os
import shutil
import time
from typing import Any

from bench.e2e_sys import read_bytes_of


def run_accelerate(spec: dict[str, Any]) -> dict[str, Any]:
    """What a Hugging Face user does when the model does not fit: device_map="auto" with
    max_memory = the same RAM as moeserve's expert budget + dense weights; the rest goes to disk
    (offload_folder), and accelerate's hooks load each offloaded module's weights per forward."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(spec["threads"])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    offload = spec["offload_dir"]
    shutil.rmtree(offload, ignore_errors=True)
    os.makedirs(offload)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec["model_dir"], dtype=dtype, device_map="auto",
            max_memory={"cpu": int(spec["max_memory_bytes"])}, offload_folder=offload).eval()
        placed = sorted(set(str(v) for v in getattr(model, "hf_device_map", {}).values()))
        if "disk" not in placed:
            raise RuntimeError(f"accelerate placed nothing on disk (devices {placed}) under max_memory "
                               f"{spec['max_memory_bytes']}: the comparison would not be offloaded")
        pad = model.generation_config.pad_token_id
        pad = pad if pad is not None else model.generation_config.eos_token_id
        pad = pad[0] if isinstance(pad, list) else pad
        n = spec["max_tokens"]

        class Stamps(BaseStreamer):
            """generate() puts the prompt first, then each new token (batch-wide)."""

            def __init__(self) -> None:
                self.times: list[float] = []
                self.calls = 0

            def put(self, value: Any) -> None:
                self.calls += 1
                if self.calls > 1:
                    self.times.append(time.perf_counter())

            def end(self) -> None:
                pass

        def generate(prompts: list[list[int]], streamer: Any = None) -> None:
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), int(pad), dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, p in enumerate(prompts):              # left padding, as generate expects
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            with torch.inference_mode():
                model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=int(pad), streamer=streamer)

        out: dict[str, Any] = {"decode_ms": [], "ttft_ms": [], "generated_tokens": 0}
        io0, limit, conc = read_bytes_of(), spec["seconds_per_phase"], spec["concurrency"]
        phase0 = time.perf_counter()
        for i, ids in enumerate(spec["prompts_c1"]):
            if i and time.perf_counter() - phase0 > limit:
                break
            out["prompts_c1"] = i + 1
            st = Stamps()
            start = time.perf_counter()
            generate([ids], st)
            out["ttft_ms"].append((st.times[0] - start) * 1000)
            out["decode_ms"] += [(b - a) * 1000 for a, b in zip(st.times, st.times[1:])]
            out["generated_tokens"] += len(st.times)
        c4, done = spec["prompts_c4"], 0
        start = time.perf_counter()
        for i in range(0, len(c4), conc):                # generate batches statically: conc at a time
            if i and time.perf_counter() - start > limit:
                break
            generate(c4[i:i + conc])
            done += len(c4[i:i + conc])
        out.update(c4_seconds=time.perf_counter() - start, c4_tokens=done * n, prompts_c4=done)
        out["generated_tokens"] += done * n
        out["disk_read_bytes"] = read_bytes_of() - io0
        out["notes"] = (f"device_map placed {sum(1 for v in model.hf_device_map.values() if v == 'disk')} "
                        f"modules on disk, max_memory cpu={spec['max_memory_bytes'] / 1e9:.2f} GB")
        return out
    finally:
        shutil.rmtree(offload, ignore_errors=True)


def run_llama_cpp(spec: dict[str, Any]) -> dict[str, Any]:
    """llama-cpp-python on the BF16 GGUF with its default mmap (the parent puts this process in a
    memory cgroup, so its page cache is capped too). Greedy (top_k=1, temperature 0), EOS ignored
    (generate() yields until told to stop) so every request makes the same number of tokens."""
    import llama_cpp

    n = spec["max_tokens"]
    ctx = max(len(p) for p in spec["prompts_c1"] + spec["prompts_c4"]) + n + 8
    llm = llama_cpp.Llama(spec["gguf"], n_ctx=ctx, n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], n_batch=512, verbose=False)

    def one(ids: list[int]) -> list[float]:
        stamps: list[float] = []
        for _ in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) >= n:
                break
        return stamps

    out: dict[str, Any] = {"decode_ms": [], "ttft_ms": [], "generated_tokens": 0}
    io0, limit = read_bytes_of(), spec["seconds_per_phase"]
    phase0 = time.perf_counter()
    for i, ids in enumerate(spec["prompts_c1"]):
        if i and time.perf_counter() - phase0 > limit:
            break
        out["prompts_c1"] = i + 1
        start = time.perf_counter()
        stamps = one(ids)
        out["ttft_ms"].append((stamps[0] - start) * 1000)
        out["decode_ms"] += [(b - a) * 1000 for a, b in zip(stamps, stamps[1:])]
        out["generated_tokens"] += len(stamps)
    start, c4, done = time.perf_counter(), 0, 0
    for i, ids in enumerate(spec["prompts_c4"]):
        if i >= spec["concurrency"] and time.perf_counter() - start > limit:
            break
        c4 += len(one(ids))
        done += 1
    out.update(c4_seconds=time.perf_counter() - start, c4_tokens=c4, prompts_c4=done)
    out["generated_tokens"] += c4
    out["disk_read_bytes"] = read_bytes_of() - io0
    out["notes"] = ("llama-cpp-python's Llama decodes one sequence at a time, so the 4 concurrent "
                    f"requests run one after another; GGUF {os.path.basename(spec['gguf'])}, mmap")
    return out
