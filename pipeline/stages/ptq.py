"""Post-training quantization of a merged model: the methods of quantize.py, after PEFT.

GPTQ calibrates on the base weights alone; adapter / prompt modules kept by the merge stay fp32 beside them.
"""
from __future__ import annotations

from pathlib import Path

from ..config import Params, PtqCfg
from .quantize import quantize


def run(src: Path, cfg: PtqCfg, out: Path, params: Params) -> dict:
    return quantize(src, cfg, out, params)
