"""Weight quantization of an fp model: NF4 (bitsandbytes, via transformers) or 4-bit GPTQ (GPTQModel).

auto-gptq, the library the card names, is abandoned: it fails to import with transformers 5 and peft >= 0.14 and
refuses to run without CUDA. GPTQModel is its maintained successor and transformers' own GPTQ backend; it writes
the standard GPTQ checkpoint format, which `AutoModelForCausalLM.from_pretrained` loads back.
ptq.py reuses `quantize()`: the same methods, placed after a merge.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .. import artifact, data
from ..config import Params, QuantMethodCfg, QuantizeCfg
from ..models import device_of, dtype_of, save_weights


def bnb_config(cfg: QuantMethodCfg, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=cfg.double_quant)


def nf4(weights: Path, cfg: QuantMethodCfg, out: Path, params: Params) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device_of(params.model)
    dtype = dtype_of(params.model, device)
    model = AutoModelForCausalLM.from_pretrained(weights, quantization_config=bnb_config(cfg, dtype), dtype=dtype,
                                                 device_map={"": str(device)},
                                                 trust_remote_code=params.model.trust_remote_code)
    save_weights(model, AutoTokenizer.from_pretrained(weights, trust_remote_code=params.model.trust_remote_code), out)


def gptq(weights: Path, cfg: QuantMethodCfg, out: Path, params: Params) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 1, 4)))
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    device = device_of(params.model)
    tok = AutoTokenizer.from_pretrained(weights, trust_remote_code=params.model.trust_remote_code)
    calib = [{"input_ids": ids[0].tolist(), "attention_mask": [1] * ids.shape[1]}
             for ids in data.calibration(tok, params.data.calibration, params.seed)]
    qcfg = QuantizeConfig(bits=cfg.bits, group_size=cfg.group_size, sym=True, desc_act=False)
    default_dtype = torch.get_default_dtype()  # GPTQModel changes the process-wide default; later loads need it back
    try:
        model = GPTQModel.load(str(weights), qcfg, device=str(device), dtype=dtype_of(params.model, device),
                               trust_remote_code=params.model.trust_remote_code)
        model.quantize(calib, batch_size=1)
        model.save(str(out))
    finally:
        torch.set_default_dtype(default_dtype)
    tok.save_pretrained(out)
    (out / "quant_log.csv").unlink(missing_ok=True)  # GPTQModel's per-layer log: not part of the model


def quantize(src: Path, cfg: QuantMethodCfg, out: Path, params: Params) -> dict:
    """Quantize the base weights of `src` (its own, or the ones a PEFT node references). PEFT parts (LoRA under a ptq
    stage; adapters / prompt after a merge) are copied beside the quantized base and stay fp32. GPTQ calibrates on
    the base alone: forward hooks carrying the PEFT parts, put on the model GPTQModel loads, saw no calls during its
    layer-by-layer pass (measured on the tiny model), so the PEFT-aware calibration the literature suggests is not done."""
    {"nf4": nf4, "gptq": gptq}[cfg.method](artifact.weights_dir(src), cfg, out, params)
    peft = artifact.peft_dir(src)
    if peft.is_dir():
        shutil.copytree(peft, artifact.peft_dir(out), ignore=shutil.ignore_patterns("seeds"))
    return {"format": cfg.method, "weights": "."}


def run(src: Path, cfg: QuantizeCfg, out: Path, params: Params) -> dict:
    return quantize(src, cfg, out, params)
