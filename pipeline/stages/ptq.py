"""Post-training quantization of a merged model: the methods of quantize.py, after PEFT.

GPTQ under unmerged LoRA calibrates with every PEFT part active (our own pass); after a merge it runs through
GPTQModel on the base weights alone (see quantize.py). Adapter / prompt / prefix modules stay fp32 beside the base.
"""
from __future__ import annotations

from pathlib import Path

from ..config import Params, PtqCfg
from .quantize import quantize


def run(src: Path, cfg: PtqCfg, out: Path, params: Params) -> dict:
    return quantize(src, cfg, out, params)
