"""Post-training quantization of a merged model: the methods of quantize.py, after PEFT.

GPTQ calibrates with the node's PEFT parts active (LoRA under an unmerged ptq, adapter / prompt / prefix modules kept
by a merge), which stay fp32 beside the quantized base (see quantize.py).
"""
from __future__ import annotations

from pathlib import Path

from ..config import Params, PtqCfg
from .quantize import quantize


def run(src: Path, cfg: PtqCfg, out: Path, params: Params) -> dict:
    return quantize(src, cfg, out, params)
