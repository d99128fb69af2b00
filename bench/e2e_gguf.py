"""The llama.cpp baseline's model: the same checkpoint converted to a BF16 GGUF by llama.cpp's own
convert_hf_to_gguf.py, taken from the llama-cpp-python source distribution of the installed version
(pip's cache, or `pip download` of the sdist), converted once and cached next to the model."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile
import tempfile

from convert.model_store import moeserve_home

CONVERTER = "vendor/llama.cpp/convert_hf_to_gguf.py"
# the converter imports its sibling packages: the model classes and the matching gguf-py
MEMBERS = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/",
           "vendor/llama.cpp/gguf-py/")


def llama_cpp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("llama_cpp_python")
    except PackageNotFoundError as e:
        raise RuntimeError("llama-cpp-python is not installed (pip install llama-cpp-python)") from e


def converter_path(timeout: float = 600) -> str:
    """convert_hf_to_gguf.py of the installed llama-cpp-python version, extracted once under
    $MOESERVE_HOME/llama.cpp-<version>/."""
    ver = llama_cpp_version()
    root = os.path.join(moeserve_home(None), f"llama.cpp-{ver}")
    script = os.path.join(root, CONVERTER)
    if os.path.isfile(script):
        return script
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _find_sdist(ver, tmp, timeout)
        extract = tempfile.mkdtemp(dir=os.path.dirname(root) or ".", prefix=".llama.cpp-")
        with tarfile.open(sdist) as tar:
            top = tar.getnames()[0].split("/")[0]
            want = [m for m in tar.getmembers()
                    if any(m.name.startswith(f"{top}/{p}") for p in MEMBERS)]
            if not any(m.name == f"{top}/{CONVERTER}" for m in want):
                raise RuntimeError(f"{sdist} does not contain {CONVERTER}")
            tar.extractall(extract, members=want, filter="data")
        os.replace(os.path.join(extract, top), root)
        os.rmdir(extract)
    return script


def _find_sdist(ver: str, tmp: str, timeout: float) -> str:
    cached = glob.glob(os.path.expanduser(f"~/.cache/pip/**/llama_cpp_python-{ver}.tar.gz"), recursive=True)
    if cached:
        return cached[0]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={ver}", "-d", tmp]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    found = glob.glob(os.path.join(tmp, f"llama_cpp_python-{ver}.tar.gz"))
    if r.returncode != 0 or not found:
        raise RuntimeError(f"could not download the llama-cpp-python {ver} sdist (needed for "
                           f"convert_hf_to_gguf.py): {r.stderr.strip()[-400:]}")
    return found[0]


def gguf_path(model_dir: str) -> str:
    return os.path.normpath(model_dir) + "-bf16.gguf"


def ensure_gguf(model_dir: str, timeout: float = 1800) -> str:
    """``<model_dir>-bf16.gguf``, converted on first use (written to a temporary name, then renamed,
    so an interrupted conversion never leaves a truncated file that looks finished)."""
    out = gguf_path(model_dir)
    if os.path.isfile(out) and os.path.getmtime(out) >= _newest(model_dir):
        return out
    script = converter_path()
    tmp = out + ".partial"
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(script), "gguf-py"))
    r = subprocess.run([sys.executable, script, "--outtype", "bf16", "--outfile", tmp, model_dir],
                       capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0 or not os.path.isfile(tmp):
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {model_dir}: {r.stderr.strip()[-600:]}")
    os.replace(tmp, out)
    return out


def _newest(model_dir: str) -> float:
    return max(os.path.getmtime(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
               if f.endswith(".safetensors"))


LLAMA_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def ensure_llama_quantized(model_dir: str, qtype: str) -> str:
    """``<model_dir>-<qtype>.gguf``: the BF16 GGUF quantized by llama.cpp's own quantizer
    (llama_model_quantize, as `llama-quantize` does), made once and cached."""
    import llama_cpp
    bf16 = ensure_gguf(model_dir)
    out = os.path.normpath(model_dir) + f"-{qtype}.gguf"
    if os.path.isfile(out) and os.path.getmtime(out) >= os.path.getmtime(bf16):
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[qtype])
    params.nthread = os.cpu_count() or 1
    tmp = out + ".partial"
    rc = llama_cpp.llama_model_quantize(bf16.encode(), tmp.encode(), params)
    if rc != 0 or not os.path.isfile(tmp):
        raise RuntimeError(f"llama_model_quantize({qtype}) failed on {bf16} (rc {rc})")
    os.replace(tmp, out)
    return out
