"""The built-in default model: SmolLM2-135M-Instruct upcycled into a Mixtral-format MoE, built offline.

``ensure_default_model()`` returns the cached model directory, building it on first use:
GGUF -> dense Llama checkpoint (convert.gguf_import) -> calibration answers and FFN-input states ->
k-means routers and perturbed experts (convert.upcycle) -> sharded bf16 safetensors (convert.moe_writer)
-> measured model card (convert.routing_stats, convert.model_card). Builds are atomic and locked
(convert.model_store). CLI: ``moeserve build-default`` or ``python -m convert.default_model``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from typing import Any

import torch

from configs import presets
from configs.presets import DEFAULT_PRESET, add_build_arguments
from convert.gguf_import import find_packaged_gguf, import_gguf, write_json
from convert.model_store import BuildError, build_atomically, moeserve_home
from convert.progress import quiet_library_bars

log = logging.getLogger(__name__)

DENSE_NAME = "smollm2-135m-instruct"
# bump when the build recipe changes, so cached builds made by older code are rebuilt
BUILDER_VERSION = 1
# the MoE checkpoint's byte layout (convert/moe_writer.py); 2: experts first, 4 KiB-aligned, so
# offloaded experts are read straight into their slots. Bumping it rebuilds the MoE only
CHECKPOINT_LAYOUT = 2
# calibration runs with a fixed thread count: CPU matmul reductions depend on it, and the greedy
# answers (hence the routers) must not change with the machine's core count
CALIBRATION_THREADS = 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def load_preset(name: str) -> dict[str, Any]:
    try:
        return presets.load_preset(name)
    except ValueError as e:
        raise BuildError(str(e)) from None


def ensure_dense_model(home: str | None = None) -> str:
    """Directory of the dense SmolLM2-135M-Instruct checkpoint converted from the packaged GGUF."""
    gguf = find_packaged_gguf()
    params = {"builder_version": BUILDER_VERSION, "source": os.path.basename(gguf),
              "source_bytes": os.path.getsize(gguf)}
    target = os.path.join(moeserve_home(home), "models", DENSE_NAME)

    def build(tmp: str) -> None:
        quiet_library_bars()
        import_gguf(gguf, tmp)
    return build_atomically(target, params, build, need_bytes=400_000_000)


def _expected_bytes(dense_dir: str, experts: int) -> int:
    with open(os.path.join(dense_dir, "config.json"), encoding="utf-8") as f:
        c = json.load(f)
    ffn = 3 * c["hidden_size"] * c["intermediate_size"] * 2  # bf16 bytes of one expert
    return os.path.getsize(os.path.join(dense_dir, "model.safetensors")) + c["num_hidden_layers"] * experts * ffn


def write_generation_config(src: str, dst: str, generation: dict[str, Any]) -> None:
    """The dense model's generation_config.json with the preset's measured sampling defaults
    (bench/generation_defaults.py), which a server applies to requests that leave them out."""
    with open(src, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.update(generation)
    cfg["do_sample"] = generation.get("temperature", 1.0) > 0
    write_json(dst, cfg)


def _build_moe(dense_dir: str, out: str, params: dict[str, Any], progress: bool,
               generation: dict[str, Any] | None = None) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    from convert.calibration import ANSWERS_FILE, answers_key, load_answers
    from convert.calibration import BATCH_SIZE as CALIBRATION_BATCH
    from convert.model_card import render_model_card
    from convert.moe_writer import mixtral_config_dict, plan_tensors, write_checkpoint
    from convert.mtbench import calibration_questions, heldout_texts
    from convert.routing_stats import measure
    from convert.upcycle import (_seed, collect_ffn_inputs, generate_calibration_chats, router_scale,
                                spherical_kmeans)

    e, k = params["experts"], params["top_k"]
    quiet_library_bars()
    threads = torch.get_num_threads()
    torch.set_num_threads(CALIBRATION_THREADS)
    try:
        tok = AutoTokenizer.from_pretrained(dense_dir)
        model = LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
        t0 = time.monotonic()
        questions = calibration_questions()
        gguf = find_packaged_gguf()
        key = answers_key(os.path.basename(gguf), os.path.getsize(gguf), questions,
                          params["calibration_max_new_tokens"], params["calibration_turns"],
                          CALIBRATION_THREADS)
        # the shipped answers are what generation gives for this key (same weights, ~100 s saved)
        chats = load_answers(key, questions)
        if chats is None:
            log.info("no shipped calibration answers for these settings: generating them")
            chats = generate_calibration_chats(model, tok, questions,
                                               params["calibration_max_new_tokens"],
                                               turns=params["calibration_turns"],
                                               batch_size=CALIBRATION_BATCH, progress=progress)
        else:
            log.info("calibration answers: shipped with moeserve (convert/data/%s)",
                     os.path.basename(ANSWERS_FILE))
        seqs = [list(tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in chats]
        states = collect_ffn_inputs(model, seqs, progress=progress)  # per layer [N, H]
        log.info("calibration: %d conversations, %d tokens (%.0fs)", len(seqs), states[0].shape[0],
                 time.monotonic() - t0)
        routers = []
        from convert.progress import progress as tqdm
        for li, x in enumerate(tqdm(states, desc="k-means routers", unit="layer", disable=not progress)):
            cent, _ = spherical_kmeans(x, e, _seed(params["seed"], "kmeans", li))
            routers.append(cent * router_scale(x, cent, params["router_logit_std"]))  # [E, H]
        del states
        dense = load_file(os.path.join(dense_dir, "model.safetensors"))
        plan = plan_tensors(dense, routers, e, params["expert_noise"], params["seed"])
        write_checkpoint(plan, out, int(params["shard_bytes"]), progress=progress)
        with open(os.path.join(dense_dir, "config.json"), encoding="utf-8") as f:
            write_json(os.path.join(out, "config.json"), mixtral_config_dict(json.load(f), e, k))
        for name in TOKENIZER_FILES:
            shutil.copyfile(os.path.join(dense_dir, name), os.path.join(out, name))
        if generation:
            name = "generation_config.json"
            write_generation_config(os.path.join(dense_dir, name), os.path.join(out, name),
                                    generation)
        log.info("measuring routing and perplexity on held-out text")
        tok.padding_side = "right"
        stats = measure(model, tok, out, heldout_texts(), progress=progress)
    finally:
        torch.set_num_threads(threads)
    write_json(os.path.join(out, "moeserve-stats.json"), stats)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(render_model_card(params, stats, size))
    log.info("held-out perplexity: dense %.3f, MoE %.3f", stats["dense_perplexity"], stats["moe_perplexity"])


def build_default(preset: str = DEFAULT_PRESET, experts: int | None = None, top_k: int | None = None,
                  out: str | None = None, home: str | None = None, progress: bool = True) -> str:
    """Build (or reuse) the upcycled MoE; returns its directory.

    ``experts``/``top_k`` override the preset; the model is then named ``smollm2-moe-{E}x-top{K}``.
    ``out`` defaults to <home>/models/<name>.
    """
    params = load_preset(preset)
    # not a build parameter: changing the defaults must not rebuild the model (the server reads
    # the preset's values for builds whose generation_config.json predates them)
    generation = params.pop("generation", None)
    if experts is not None or top_k is not None:
        params["experts"] = int(experts if experts is not None else params["experts"])
        params["top_k"] = int(top_k if top_k is not None else params["top_k"])
        params["name"] = f"smollm2-moe-{params['experts']}x-top{params['top_k']}"
    if not 1 <= params["top_k"] <= params["experts"]:
        raise BuildError(f"invalid top_k={params['top_k']}: must be between 1 and experts={params['experts']}")
    if params["experts"] < 2:
        raise BuildError(f"invalid experts={params['experts']}: an MoE needs at least 2 experts")
    params["builder_version"] = BUILDER_VERSION
    params["checkpoint_layout"] = CHECKPOINT_LAYOUT
    dense_dir = ensure_dense_model(home)
    target = out or os.path.join(moeserve_home(home), "models", params["name"])
    need = int(_expected_bytes(dense_dir, params["experts"]) * 1.02) + 50_000_000
    return build_atomically(target, params, lambda tmp: _build_moe(dense_dir, tmp, params, progress, generation),
                            need_bytes=need)


def ensure_default_model(preset: str = DEFAULT_PRESET, home: str | None = None, progress: bool = True) -> str:
    """The preset's model directory, built on first use and reused afterwards (safe across processes)."""
    return build_default(preset, home=home, progress=progress)


def run_build(args: argparse.Namespace) -> int:
    """CLI body of ``moeserve build-default``: prints the model directory; 1 on a build error."""
    t0 = time.monotonic()
    try:
        path = build_default(args.preset, experts=args.experts, top_k=args.top_k, out=args.out,
                             progress=args.progress)
    except BuildError as e:
        log.error("%s", e)
        return 1
    log.info("model ready in %.0fs", time.monotonic() - t0)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.default_model",
                                     description="Build the built-in default MoE model.")
    add_build_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_build(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
