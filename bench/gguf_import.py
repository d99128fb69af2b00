"""GGUF files served by moeserve: llama.cpp's own conversions of a default preset (its
convert_hf_to_gguf.py to BF16, its quantizer to Q8_0 and Q4_K_M) converted as ``--model FILE.gguf``
converts them, each into an empty $MOESERVE_HOME (timed), then checked tensor by tensor:

- the BF16 file against the checkpoint it was made from (every tensor must be equal: names, merged
  experts, llama.cpp's q/k permutation undone, config);
- every file's routed experts, as stored (int8, int4 or bf16), against the file's own dequantized
  values, by the file's ggml type: relative error ||stored - file|| / ||file|| per matrix.

    python -m bench.gguf_import [--preset smollm2-moe-8x] [--json OUT]

Writes ``{"results": [{"file", "ggml_type", "stored_as", "matrices", "mean_rel_error",
"max_rel_error"}], "conversions": [...], "bf16_equal": ...}``, a table and a plot.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from typing import Any

import torch

from bench.common import RESULTS, bar_plot, machine, table, write_json

log = logging.getLogger("bench.gguf_import")
# (llama.cpp's file, --quantize): None is the format moeserve chooses for the file
CASES = (("bf16", None), ("q8_0", None), ("q8_0", "int4"), ("q4_k_m", None), ("q4_k_m", "int4"))


def stored_experts(out: str, model: Any) -> list[dict[str, torch.Tensor]]:
    """Every expert of the conversion ``out`` as fp32 gate/up/down, in ``model.keys`` order."""
    from cache.expert_store import locate_experts
    from cache.provider import read_tensor
    from cache.quant import format_from_config, unpack_int4_cpu
    from cache.quantizers import dequantize_int4
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        qc = json.load(f).get("quantization_config")
    if not qc:                                          # per-expert tensors
        from safetensors import safe_open
        with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
            return [{p: f.get_tensor(n).float() for p, n in model.expert_names(i).items()}
                    for i in range(len(model.keys))]
    fmt = format_from_config(qc, model.inter, model.hidden, torch.bfloat16)
    shapes = fmt.shapes()
    experts = []
    for s in locate_experts(os.path.join(out, qc["expert_store"]), fmt, qc["num_moe_layers"], qc["num_experts"]):
        views = fmt.views(read_tensor(s.packed).clone())
        one = {}
        for proj in ("gate", "up", "down"):
            v = getattr(views, proj)
            one[proj] = (v.q.float() * v.scales.float()[:, None] if fmt.kind == "int8" else
                         dequantize_int4(unpack_int4_cpu(v.q, *shapes[proj]), v.scales, fmt.group_size))
        experts.append(one)
    return experts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gguf_import", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="smollm2-moe-8x", help="built-in default model preset")
    p.add_argument("--json", default=os.path.join(RESULTS, "gguf_import.json"), help="output JSON path")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from safetensors.torch import load_file

    from bench.quality import expert_format, llama_gguf
    from convert.default_model import ensure_default_model
    from convert.gguf_convert import ensure_gguf
    from convert.gguf_model import EXPERTS, GgufModel
    base = ensure_default_model(args.preset)
    rows: list[dict[str, Any]] = []
    conversions: list[dict[str, Any]] = []
    bf16_equal = None
    for qtype, kind in CASES:
        path = llama_gguf(base, qtype)
        with tempfile.TemporaryDirectory() as home:
            t0 = time.perf_counter()
            out = ensure_gguf(path, kind, home=home, progress=False)
            seconds = time.perf_counter() - t0
            model = GgufModel(path)
            stored = stored_experts(out, model)
            conversions.append({"file": os.path.basename(path), "file_gb": round(os.path.getsize(path) / 1e9, 3),
                                "stored_as": expert_format(out) + ("" if kind else " (default)"),
                                "seconds": round(seconds, 1)})
            if qtype == "bf16":
                theirs = load_file(os.path.join(base, "model.safetensors"))
                ours = load_file(os.path.join(out, "model.safetensors"))
                bf16_equal = {"tensors": len(theirs), "same_names": sorted(ours) == sorted(theirs),
                              "equal": sum(torch.equal(ours.get(k, torch.empty(0)), t) for k, t in theirs.items())}
            errors: dict[str, list[float]] = {}
            for i, (mi, _) in enumerate(model.keys):
                layer = model.layout.moe_layers[mi]
                want = model.read(i)
                for proj, name in zip(("gate", "up", "down"), EXPERTS):
                    t = model.file.type_name(f"blk.{layer}.{name}.weight")
                    err = float((stored[i][proj] - want[proj]).norm() / want[proj].norm())
                    errors.setdefault(t, []).append(err)
            for t, errs in sorted(errors.items()):
                rows.append({"file": os.path.basename(path), "ggml_type": t, "stored_as": expert_format(out),
                             "matrices": len(errs), "mean_rel_error": sum(errs) / len(errs),
                             "max_rel_error": max(errs), "mean (%)": f"{100 * sum(errs) / len(errs):.3f}",
                             "max (%)": f"{100 * max(errs):.3f}"})
    out_json = {"machine": machine(), "preset": args.preset, "results": rows, "conversions": conversions,
                "bf16_equal": bf16_equal}
    path = write_json(os.path.abspath(args.json), out_json)
    print(table(rows, ["file", "ggml_type", "stored_as", "matrices", "mean (%)", "max (%)"]))
    print(table(conversions, ["file", "file_gb", "stored_as", "seconds"]))
    print(f"BF16 file against its checkpoint: {bf16_equal}")
    png = os.path.splitext(path)[0] + ".png"
    bar_plot(png, [f"{r['ggml_type']}\n-> {r['stored_as']}" for r in rows], [100 * r["mean_rel_error"] for r in rows],
             "mean relative error of the stored experts (%)", f"GGUF experts as moeserve stores them, {args.preset}")
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
