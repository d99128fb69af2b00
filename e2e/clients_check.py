"""Third-party clients against a running moeserve, used as their users use them.

    python e2e/clients_check.py --base-url http://127.0.0.1:8000/v1
    python e2e/clients_check.py --start            # starts `moeserve serve` itself, stops it after

Run it with a Python that has the clients installed (`make clients-check` makes one:
.venv-clients, from e2e/requirements-clients.txt), never the project's venv: the OpenAI Python
SDK, LangChain's ChatOpenAI, LiteLLM, Simon Willison's `llm` CLI (an OpenAI-compatible model in
its extra-openai-models.yaml, in a private config folder) and, when `node` and the `openai` npm
package are found (--node-modules), the OpenAI Node SDK (e2e/clients_node.cjs).

Each check passes when the client gets through without an error and its answer has the shape the
client promises (text, a tool call with JSON arguments that follow the schema, a parsed object).
What a 135M model writes inside that shape is not judged: with tool_choice auto it may answer in
text instead of calling the tool, and that passes (the check records which it did).

Writes bench/results/clients_check.json (client versions, each check: pass/fail, seconds, error)
and prints a table. Exit status 1 when a check failed.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Iterator, Optional

from client_kit import REPO, Check, Run, short
from clients_libs import langchain_checks, litellm_checks, llm_checks
from clients_native import anthropic_checks, langchain_native_checks, ollama_checks
from clients_sdk import node_checks, openai_checks
from launch import free_port, get_json, launched

RESULTS = os.path.join(REPO, "bench", "results", "clients_check.json")
LOGS = os.path.join(REPO, "bench", "results", "clients_check-logs")


@contextlib.contextmanager
def started_server(python: str, port: int, extra: list[str]) -> Iterator[str]:
    """`moeserve serve` (the built-in default model unless --model comes in extra), niced."""
    base = f"http://127.0.0.1:{port}"
    cmd = [python, "-m", "moeserve.cli", "serve", "--port", str(port), *extra]
    # a first start builds the default model
    with launched("server", cmd, {**os.environ, "PYTHONPATH": REPO}, base + "/health", REPO,
                  LOGS, deadline_s=1800):
        yield base + "/v1"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("openai", "anthropic", "ollama", "langchain-openai", "langchain-anthropic",
                 "langchain-ollama", "langchain-core", "litellm", "llm", "pydantic"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    node = shutil.which("node")
    if node:
        out["node"] = subprocess.run([node, "--version"], capture_output=True,
                                     text=True).stdout.strip()
    return out


SUITES = {"openai": openai_checks, "anthropic": anthropic_checks, "ollama": ollama_checks,
          "langchain": langchain_checks, "langchain-native": langchain_native_checks,
          "litellm": litellm_checks, "llm": llm_checks}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                       help="a running moeserve's /v1 URL (default %(default)s)")
    where.add_argument("--start", action="store_true",
                       help="start `moeserve serve` on a free port, stop it afterwards")
    ap.add_argument("--server-python", default=os.path.join(REPO, ".venv", "bin", "python"),
                    help="python with moeserve installed, for --start (default %(default)s)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra flag for `moeserve serve` with --start (repeatable)")
    ap.add_argument("--node-modules", default=os.environ.get("MOESERVE_CLIENTS_NODE_MODULES"),
                    help="node_modules folder holding the openai npm package")
    ap.add_argument("--only", action="append", choices=[*SUITES, "node"],
                    help="run only these clients (repeatable)")
    ap.add_argument("--out", default=RESULTS, help="JSON results (default %(default)s)")
    args = ap.parse_args(argv)

    with contextlib.ExitStack() as stack:
        base = (stack.enter_context(started_server(args.server_python, free_port(),
                                                   args.server_arg))
                if args.start else args.base_url.rstrip("/"))
        model = get_json(base + "/models")["data"][0]["id"]
        run = Run(base, model)
        vers = versions()
        print(f"moeserve at {base}, model {model}; clients: "
              + ", ".join(f"{k} {v}" for k, v in vers.items()), flush=True)
        t0 = time.perf_counter()
        for name, suite in SUITES.items():
            if args.only and name not in args.only:
                continue
            try:
                suite(run)
            except Exception as exc:   # an import error: the whole client fails, the rest runs
                run.checks.append(Check(name, "import", False, 0.0,
                                        short(f"{type(exc).__name__}: {exc}", 600)))
                print(f"  FAIL {name}: {exc}", flush=True)
        if not args.only or "node" in args.only:
            vers["openai (npm)"] = node_checks(run, args.node_modules) or "not installed"
        total = time.perf_counter() - t0

    failed = [c for c in run.checks if not c.ok]
    report = {"base_url": run.base_url if not args.start else "started by --start",
              "model": run.model, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "seconds": round(total, 1), "versions": vers,
              "passed": len(run.checks) - len(failed), "failed": len(failed),
              "checks": [asdict(c) for c in run.checks]}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print()
    print(table(run.checks, vers))
    print(f"\n{report['passed']}/{len(run.checks)} passed in {total:.0f}s; wrote "
          f"{os.path.relpath(args.out, REPO)}")
    return 1 if failed else 0


def table(checks: list[Check], vers: dict[str, str]) -> str:
    ver_of = {"openai-py": vers.get("openai"), "anthropic-py": vers.get("anthropic"),
              "ollama-py": vers.get("ollama"), "lc-anthropic": vers.get("langchain-anthropic"),
              "lc-ollama": vers.get("langchain-ollama"), "langchain": vers.get("langchain-openai"),
              "litellm": vers.get("litellm"), "llm": vers.get("llm"),
              "openai-node": vers.get("openai (npm)")}
    rows = [("client", "check", "result", "s", "error")]
    for c in checks:
        rows.append((f"{c.client} {ver_of.get(c.client) or ''}".strip(), c.check,
                     "pass" if c.ok else "FAIL", f"{c.seconds:.1f}", short(c.error, 90) or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
        if k == 0:
            lines.append("  ".join("-" * w for w in widths) + "  -----")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
