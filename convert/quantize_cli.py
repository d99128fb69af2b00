"""``moeserve quantize`` flags (torch-free: the CLI builds its parser without importing torch)."""
from __future__ import annotations

import argparse

from configs.engine import GROUP_SIZES, QUANT_FORMATS


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="checkpoint directory to quantize, or the org/name of one in the local "
                   "Hugging Face cache")
    p.add_argument("--quantize", required=True, choices=[q for q in QUANT_FORMATS if q != "none"],
                   help="int8: symmetric per output channel; int4: asymmetric group-wise")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None,
                   help="int4 group size; default: the largest of 32/64/128 dividing every "
                   "expert input dimension")
    p.add_argument("--layout", choices=("cpu", "cuda"), default="cpu",
                   help="int4 pack layout: the kernel of the device that will serve it "
                   "(cuda needs a CUDA device to pack)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output directory (default: $MOESERVE_HOME/models/<name>-<format>)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
