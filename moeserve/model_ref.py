"""--model as a user gives it: a checkpoint directory, or a Hugging Face repo id (``org/name``)
already in the local Hugging Face cache (``hf download org/name`` puts it there). moeserve never
downloads: the lookup runs offline through huggingface_hub, the library that writes that cache."""
from __future__ import annotations

import logging
import os

from configs.models import REPO_ID

log = logging.getLogger("moeserve")


def resolve_model(arg: str) -> str:
    """The checkpoint directory ``arg`` names; FileNotFoundError saying what was looked for."""
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
    return check_model_dir(path)


def check_model_dir(path: str) -> str:
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        raise FileNotFoundError(f"--model {path!r}: a GGUF file (llama.cpp, Ollama); moeserve reads "
                                "Hugging Face checkpoints (config.json + safetensors), which also "
                                "hold the experts in the layout its cache streams: fetch the model's "
                                "safetensors release (hf download org/name) and quantize it with "
                                "--quantize int4 or int8")
    if not os.path.isdir(path):
        what = "not a directory" if os.path.exists(path) else "no such directory"
        raise FileNotFoundError(f"--model {path!r}: {what} (a Hugging Face checkpoint "
                                "directory with config.json, safetensors weights and tokenizer, "
                                "or the org/name of one in the local Hugging Face cache)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model {path!r}: no config.json in this directory")
    return path


def _hub_cache() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE
