"""--model as a user gives it: a checkpoint directory, a Hugging Face repo id (``org/name``)
already in the local Hugging Face cache (``hf download org/name`` puts it there), a GGUF file, or
the ``name:tag`` of a model Ollama has pulled. moeserve never downloads: the Hugging Face lookup runs
offline through huggingface_hub, the library that writes that cache; a GGUF is converted once
(convert/gguf_convert.py)."""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Optional

from configs.engine import QUANT_FORMATS
from configs.server import LOG_LEVELS
from configs.models import REPO_ID
from convert.gguf_parts import first_parts, listing

log = logging.getLogger("moeserve")
# [host/][namespace/]model[:tag], as `ollama pull` takes it (hf.co/org/repo:quant included)
_PART = r"[A-Za-z0-9][A-Za-z0-9_.\-]*"
OLLAMA_NAME = re.compile(rf"((?:{_PART}/){{0,2}}{_PART})(?::([A-Za-z0-9_][A-Za-z0-9_.\-]*))?")
OLLAMA_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_PARAMS_LAYER = "application/vnd.ollama.image.params"
# Ollama's parameter names -> generation_config.json's (server/defaults.py)
OLLAMA_SAMPLING = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                   "repeat_penalty": "repetition_penalty"}


def resolve_model(arg: str, quantize: Optional[str] = None, group_size: Optional[int] = None,
                  progress: bool = True) -> str:
    """The checkpoint directory ``arg`` names (a GGUF converted with its experts in ``quantize``);
    FileNotFoundError saying what was looked for."""
    gguf, name, served = _gguf_source(arg)
    if gguf is not None:
        from convert.gguf_convert import ensure_gguf
        if served is not None:          # logged here, not where the HTTP process only asks
            log.info("--model %s: the GGUF Ollama pulled, %s", arg, gguf)
        return ensure_gguf(gguf, quantize, group_size, name=name, served=served, progress=progress)
    if os.path.exists(arg) or not REPO_ID.fullmatch(arg):
        return check_model_dir(arg)
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError
    try:
        path = snapshot_download(repo_id=arg, local_files_only=True)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"--model {arg!r}: no such directory, and not in the local Hugging Face cache "
            f"({_hub_cache()}); moeserve does not download: fetch it first with "
            f"`hf download {arg}` (or give the checkpoint's directory)") from None
    except ValueError as e:       # huggingface_hub's HFValidationError: not a valid repo id
        raise FileNotFoundError(f"--model {arg!r}: no such directory, nor a valid Hugging Face "
                                f"repo id ({e})") from None
    log.info("--model %s: the local Hugging Face cache copy at %s", arg, path)
    gguf = gguf_in_dir(path)
    if gguf is not None:                 # a GGUF release (hf download ggml-org/...-GGUF)
        from convert.gguf_convert import ensure_gguf
        return ensure_gguf(gguf, quantize, group_size, served=arg, progress=progress)
    return check_model_dir(path)


def gguf_in_dir(path: str) -> Optional[str]:
    """The one GGUF model of a directory that holds no checkpoint (no config.json): its file, or
    its first part when split; None when it is not such a directory; FileNotFoundError naming
    the files when there are several models."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    found = first_parts(sorted(n for n in os.listdir(path) if n.lower().endswith(".gguf")))
    if len(found) > 1:
        raise FileNotFoundError(f"--model {path!r}: no config.json, and {len(found)} GGUF models "
                                f"({listing(found)}): give one of them")
    if not found:           # releases of several quantizations keep each in a subfolder (unsloth's)
        subs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))
                      and any(n.lower().endswith(".gguf") for n in os.listdir(os.path.join(path, d))))
        if subs:
            raise FileNotFoundError(f"--model {path!r}: no config.json and no GGUF file; GGUF models are in "
                                    f"its subfolders {listing(subs)}: name one (--model {os.path.join(path, subs[0])})")
    return os.path.join(path, found[0]) if found else None


def _gguf_source(arg: str) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """(GGUF path, name for its conversion, served name) when ``arg`` is a GGUF file or a model
    Ollama has pulled (served by its Ollama name); Nones otherwise."""
    if os.path.isfile(arg) and (arg.lower().endswith(".gguf") or _has_gguf_magic(arg)):
        return arg, None, None
    in_dir = gguf_in_dir(arg)
    if in_dir is not None:
        return in_dir, None, None
    found = _ollama_manifest(arg)
    if found is None:
        return None, None, None
    store, manifest, shown = found
    blob = _ollama_layer(arg, store, manifest, OLLAMA_MODEL_LAYER)
    if blob is None:
        raise FileNotFoundError(f"--model {arg!r}: Ollama's manifest {manifest} names no model file")
    return blob, "ollama--" + shown.replace("/", "--").replace(":", "-"), shown


def _ollama_manifest(arg: str) -> Optional[tuple[str, str, str]]:
    """(Ollama's store, the manifest, the name as pulled) of the model Ollama has pulled that ``arg`` names; None
    when ``arg`` is no such name; FileNotFoundError for a name:tag Ollama has not pulled."""
    m = OLLAMA_NAME.fullmatch(arg)
    if m is None or os.path.exists(arg):
        return None
    parts = m.group(1).split("/")
    host, namespace = ("registry.ollama.ai", "library") if len(parts) == 1 else \
        ("registry.ollama.ai", parts[0]) if len(parts) == 2 else (parts[0], parts[1])
    model, tag = parts[-1], m.group(2) or "latest"
    rel = os.path.join("manifests", host, namespace, model, tag)
    stores = [d for d in ollama_stores() if os.path.isfile(os.path.join(d, rel))]
    if not stores and m.group(2) is None:
        return None         # a plain name: a directory or repo id that is not there
    if not stores:
        raise FileNotFoundError(f"--model {arg!r}: no such directory, and not a model Ollama has "
                                f"pulled (no {rel} in {' or '.join(ollama_stores())}; "
                                "OLLAMA_MODELS sets where Ollama keeps its models)")
    return stores[0], os.path.join(stores[0], rel), f"{m.group(1)}:{tag}"


def _ollama_layer(arg: str, store: str, manifest: str, media_type: str) -> Optional[str]:
    """The blob of ``manifest``'s layer of ``media_type`` (None: no such layer, or an unreadable
    manifest); FileNotFoundError for a digest that is not a sha256 or a blob that is missing."""
    try:
        with open(manifest, encoding="utf-8") as f:
            layers = json.load(f).get("layers") or []
        digest = next(x["digest"] for x in layers if x.get("mediaType") == media_type)
    except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(digest, str) or not OLLAMA_DIGEST.fullmatch(digest):
        raise FileNotFoundError(f"--model {arg!r}: Ollama's manifest {manifest} names the file "
                                f"{digest!r}, not a sha256 digest")
    blob = os.path.join(store, "blobs", digest.replace(":", "-"))
    if not os.path.isfile(blob):
        raise FileNotFoundError(f"--model {arg!r}: Ollama's file {blob} is missing")
    return blob


def ollama_sampling(arg: str) -> Optional[dict[str, Any]]:
    """The sampling defaults Ollama keeps beside a model it has pulled (its params layer: what
    Ollama samples with when a request sets nothing), under generation_config.json's names; None
    when ``arg`` names no such model or it has none."""
    found = _ollama_manifest(arg)
    try:
        blob = _ollama_layer(arg, *found[:2], OLLAMA_PARAMS_LAYER) if found else None
    except FileNotFoundError as e:      # optional defaults: the model serves without them
        log.warning("%s; Ollama's parameters ignored", e)
        return None
    if blob is None:
        return None
    try:
        with open(blob, encoding="utf-8") as f:
            params = json.load(f)
    except (OSError, ValueError) as e:
        log.warning("--model %s: Ollama's parameters %s ignored (%s)", arg, blob, e)
        return None
    out = {name: params[key] for key, name in OLLAMA_SAMPLING.items()
           if isinstance(params, dict) and isinstance(params.get(key), (int, float))}
    if out:
        log.info("--model %s: default sampling parameters from Ollama's: %s", arg, out)
    return out or None


def _has_gguf_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def ollama_stores() -> list[str]:
    """Where Ollama keeps its models: $OLLAMA_MODELS; else ~/.ollama/models, or the Linux
    service's /usr/share/ollama/.ollama/models."""
    if os.environ.get("OLLAMA_MODELS"):
        return [os.environ["OLLAMA_MODELS"]]
    return [os.path.join(os.path.expanduser("~"), ".ollama", "models"), "/usr/share/ollama/.ollama/models"]


def check_model_dir(path: str) -> str:
    if not os.path.isdir(path):
        what = "not a directory" if os.path.exists(path) else "no such directory"
        raise FileNotFoundError(f"--model {path!r}: {what} (a Hugging Face checkpoint "
                                "directory with config.json, safetensors weights and tokenizer, "
                                "the org/name of one in the local Hugging Face cache, a GGUF "
                                "file, or the name:tag of a model Ollama has pulled)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model {path!r}: no config.json in this directory")
    return path


def _hub_cache() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def resolve_in_child(arg: str, quantize: Optional[str] = None, group_size: Optional[int] = None,
                     log_level: str = "info") -> str:
    """``resolve_model`` for the HTTP process, which must not import torch: a GGUF (a file, an
    Ollama model, or a folder or Hugging Face repo holding one) is converted in a child process
    (``python -m moeserve.model_ref``); a checkpoint directory is resolved here."""
    if _gguf_source(arg)[0] is None and (os.path.exists(arg) or not REPO_ID.fullmatch(arg)):
        return resolve_model(arg, quantize, group_size)
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "moeserve.model_ref", arg, "--log-level", log_level] + \
        (["--quantize", quantize] if quantize else []) + (["--group-size", str(group_size)] if group_size else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)     # its log and progress: stderr
    if proc.returncode != 0:
        raise SystemExit(proc.returncode)    # the child printed the error
    return proc.stdout.strip().splitlines()[-1]


def main() -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m moeserve.model_ref",
                                description="Resolve --model (converting a GGUF once) and print the directory.")
    p.add_argument("model", help="as moeserve serve --model takes it")
    p.add_argument("--quantize", choices=QUANT_FORMATS, help="the experts' format")
    p.add_argument("--group-size", type=int, help="int4 group size")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                   help="log verbosity")
    args = p.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        print(resolve_model(args.model, args.quantize, args.group_size))
    except (ValueError, FileNotFoundError, RuntimeError) as e:       # as `moeserve` reports them
        return error_exit(e)
    return 0


def error_exit(e: Exception) -> int:
    """The exit status ``moeserve`` ends with on ``e``, after printing it: 2 for bad input (a
    configuration, a path), 1 for a conversion that cannot be made; another error (a bug) is
    raised again."""
    import sys
    from convert.model_store import BuildError
    if not isinstance(e, (ValueError, FileNotFoundError, BuildError)):
        raise e
    print(f"moeserve: error: {e}", file=sys.stderr)
    return 1 if isinstance(e, BuildError) else 2


if __name__ == "__main__":
    raise SystemExit(main())
