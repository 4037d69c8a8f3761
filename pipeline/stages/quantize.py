"""Weight quantization of an fp model: NF4 / LLM.int8 (bitsandbytes, via transformers), GPTQ (our own pass or
GPTQModel) and RTN (GPTQModel).

auto-gptq, the library the card names, is abandoned: it fails to import with transformers 5 and peft >= 0.14 and
refuses to run without CUDA. GPTQModel is its maintained successor and transformers' own GPTQ backend; it writes
the standard GPTQ checkpoint format, which `AutoModelForCausalLM.from_pretrained` loads back.

RTN uses GPTQModel's own weight-only path (`QuantizeConfig(weight_only={"method": "rtn"})` -> RTNConfig): no
calibration, no Hessian, the same quantizer grid and the same GPTQ packing, so an RTN checkpoint loads exactly like a
GPTQ one and the two differ only in how the integers were chosen (the comparison RTN is the floor for).

GPTQ runs our own pass (pipeline/gptq.py through pipeline/hessian.py's sequential walk): GPTQModel materialises each
decoder layer from a meta "shell" model in its layer loop, so hooks carrying LoRA, adapters, soft prompt or prefix
never fire there and it can only calibrate on the base alone. Ours walks as GPTQModel 7.6 does (true-sequential input
groups, group-aware reordering), calibrates on the inputs the layers see with the PEFT parts active (`calibration:
peft`) or on the base alone (`base`), and packs through GPTQModel's packer (pipeline/gptq_format.py), so the checkpoint
is the same standard format. On a GPU each block's column walk is one Triton kernel (pipeline/gptq_triton.py), as
GPTQModel's is one CUDA kernel that its first use in a process JIT-builds with nvcc (bench/results/README.md).

Every method returns the model "right after quantization" (for GPTQ / RTN: an fp model holding the dequantized
integers that were packed; for GPTQModel's, converted first, because its in-process modules keep the v1 zero-point
layout its kernels do not read); `quantize()` reloads the saved checkpoint the way the next stage will and records the logit difference, so a
checkpoint that does not reproduce the quantized model fails the node instead of skewing the comparison.
ptq.py reuses `quantize()`: the same methods, placed after a merge.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .. import artifact, data, gptq_format
from ..config import Params, QuantMethodCfg, QuantizeCfg, storage_format
from ..gptq import GPTQ, Quantized, quantize_together
from ..gptq_format import gptq_config
from ..hessian import sequential
from ..hybrid_loader import EMBED_INT8
from ..models import LM, dense_weight, device_of, dtype_of, is_quantized, load_base, load_lm, save_weights

# The check is on weights: the reloaded checkpoint must dequantize to exactly the quantized weights. Logits are only
# recorded: the kernels a load picks compute differently from the dense reference (GPTQModel's CPU int4 kernel,
# TorchAtenLinear, rounds activations to bf16: measured 6e-3 of the logit range on the tiny model, 2.7e-2 on
# SmolLM2-135M's 30 layers), so a logit tolerance tight enough to matter would fail correct checkpoints.
PROBE_TOKENS = 64


def bnb_config(cfg: QuantMethodCfg, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if cfg.method == "int8":  # LLM.int8: int8 rows + fp16 outlier columns (threshold 6.0, the paper's)
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=cfg.double_quant)


def bnb(src: Path, cfg: QuantMethodCfg, out: Path, params: Params) -> nn.Module:
    """NF4 or LLM.int8: bitsandbytes quantizes at load time; transformers serializes it to safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = artifact.weights_dir(src)
    device = device_of(params.model)
    dtype = dtype_of(params.model, device)
    model = AutoModelForCausalLM.from_pretrained(weights, quantization_config=bnb_config(cfg, dtype), dtype=dtype,
                                                 device_map={"": str(device)},
                                                 trust_remote_code=params.model.trust_remote_code)
    save_weights(model, AutoTokenizer.from_pretrained(weights, trust_remote_code=params.model.trust_remote_code), out)
    return model.eval()


def _fp_holding(weights: Path, dense: dict[str, torch.Tensor], params: Params) -> nn.Module:
    """The fp32 model of `weights` with the named linears' weights replaced by `dense` (the quantized values)."""
    from transformers import AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32,
                                              trust_remote_code=params.model.trust_remote_code)
    with torch.no_grad():
        for name, w in dense.items():
            fp.get_submodule(name).weight.copy_(w)
    return fp.eval()


@torch.no_grad()
def _dequantized_copy(qmodel: nn.Module, weights: Path, qcfg, params: Params) -> nn.Module:
    """An fp model holding what GPTQModel packed: its in-process modules keep v1 zero points (stored as zero - 1),
    which the kernels' `dequantize_weight` reads as v2, so they are converted first (the step a load does)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    dense = {}
    for name, mod in qmodel.named_modules():
        if isinstance(mod, BaseQuantLinear):
            if mod.qzero_format() == 1:
                convert_gptq_v1_to_v2_format_module(mod, bits=qcfg.bits, pack_dtype=mod.pack_dtype)
                mod.qzero_format(2)
            dense[name] = mod.dequantize_weight().T.float()
    return _fp_holding(weights, dense, params)


def gptqmodel(src: Path, cfg: QuantMethodCfg, out: Path, params: Params) -> nn.Module:
    """RTN (weight-only; the `rtn` method), or GPTQ by GPTQModel's own pass on the base alone (what bench/gptq_own.py
    compares our pass against), through GPTQModel, saved in the GPTQ checkpoint format."""
    weights = artifact.weights_dir(src)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 1, 4)))
    from gptqmodel import GPTQModel
    from transformers import AutoTokenizer

    device = device_of(params.model)
    tok = AutoTokenizer.from_pretrained(weights, trust_remote_code=params.model.trust_remote_code)
    calib = None
    if cfg.method == "gptq":
        calib = [{"input_ids": ids[0].tolist(), "attention_mask": [1] * ids.shape[1]}
                 for ids in data.calibration(tok, params.data.calibration, params.seed)]
    qcfg = gptq_config(cfg)
    default_dtype = torch.get_default_dtype()  # GPTQModel changes the process-wide default; later loads need it back
    try:
        model = GPTQModel.load(str(weights), qcfg, device=str(device), dtype=dtype_of(params.model, device),
                               trust_remote_code=params.model.trust_remote_code)
        model.quantize(calib, batch_size=1)
        model.save(str(out))
        reference = _dequantized_copy(model.model, weights, qcfg, params)
    finally:
        torch.set_default_dtype(default_dtype)
    tok.save_pretrained(out)
    (out / "quant_log.csv").unlink(missing_ok=True)  # GPTQModel's per-layer log: not part of the model
    return reference


@torch.no_grad()
def gptq_pass(lm: LM, cfg: QuantMethodCfg, calib: list[torch.Tensor], true_sequential: bool = True,
              group_aware: bool = True) -> dict[str, Quantized]:
    """Our GPTQ over every base linear of the decoder layers, sequential as in the paper, on the LM as it is
    deployed (LoRA, adapters, soft prompt, prefix active). Returns name (as in the plain HF model) -> result.
    true_sequential / group_aware: GPTQModel's defaults (hessian.sequential, gptq.walk_order); off for ablations."""
    found: dict[nn.Module, Quantized] = {}

    def solve(group: dict[str, GPTQ]) -> None:
        solvers = list(group.values())
        done = quantize_together(solvers, cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act,
                                 percdamp=cfg.damp_percent, group_aware=group_aware)
        found.update({s.layer: q for s, q in zip(solvers, done)})

    sequential(lm, calib, GPTQ, solve, f"gptq {cfg.bits}-bit", true_sequential)
    return {n.replace(".base_layer", ""): found[m] for n, m in lm.base.named_modules() if m in found}


def gptq_own(src: Path, cfg: QuantMethodCfg, out: Path, params: Params, parts: bool = True,
             **walk: bool) -> nn.Module:
    """GPTQ by our own pass (pipeline/gptq.py), calibrated on the inputs the layers see with the source node's PEFT
    parts active (parts=False: the base alone); packed and saved in the GPTQ checkpoint format by GPTQModel's packer.
    walk: gptq_pass's options."""
    lm = load_lm(src, params.model, parts=parts)
    quantized = gptq_pass(lm, cfg, data.calibration(lm.tokenizer, params.data.calibration, params.seed), **walk)
    reference = _fp_holding(artifact.weights_dir(src), {n: q.weight for n, q in quantized.items()}, params)
    gptq_format.save(reference, quantized, cfg, lm.tokenizer, out, dtype_of(params.model, device_of(params.model)), **walk)
    return reference


def gptq(src: Path, cfg: QuantMethodCfg, out: Path, params: Params) -> nn.Module:
    """GPTQ by our own pass; `calibration: peft` calibrates with the node's PEFT parts active, `base` on the base
    alone (the same on a bare base)."""
    return gptq_own(src, cfg, out, params, parts=cfg.calibration == "peft", true_sequential=cfg.true_sequential)


METHODS = {"nf4": bnb, "int8": bnb, "gptq": gptq, "rtn": gptqmodel}


@torch.no_grad()
def store_int8_embedding(model: nn.Module, out: Path) -> None:
    """Round `model`'s input embedding to int8 per row (symmetric absmax, one float16 scale per row) in place, write
    it to EMBED_INT8 in `out` and drop the fp tensor from the checkpoint there: load_base (and the export's
    hybrid_loader.py) put it back, as codes * scale in the model's dtype."""
    emb = model.get_input_embeddings().weight
    w = emb.detach().float()
    scale = (w.abs().amax(1) / 127).half().clamp(min=torch.finfo(torch.float16).tiny)
    codes = torch.clamp(torch.round(w / scale.float()[:, None]), -127, 127).to(torch.int8)
    save_file({"codes": codes.cpu().contiguous(), "scale": scale.cpu().contiguous()}, out / EMBED_INT8)
    emb.data = (codes.float() * scale.float()[:, None]).to(emb.dtype)  # what a load computes
    key = next(n for n, p in model.named_parameters() if p is emb)  # a tied lm_head is saved under this name only
    for f in out.glob("*.safetensors"):
        if f.name == EMBED_INT8:
            continue
        with safe_open(f, framework="pt") as sf:
            keys, meta = list(sf.keys()), sf.metadata()
        if key in keys:
            tensors = load_file(f)
            del tensors[key]
            save_file(tensors, f, metadata=meta)
    index = out / "model.safetensors.index.json"
    if index.is_file():  # a sharded checkpoint names each tensor's shard
        idx = json.loads(index.read_text())
        idx["weight_map"].pop(key, None)
        index.write_text(json.dumps(idx, indent=2))


def probe_ids(tokenizer, params: Params) -> torch.Tensor:
    """A fixed calibration-like window for round-trip checks: the first tokens of the calibration corpus."""
    return data.tokenize(tokenizer, data.corpus_text(params.data.calibration), PROBE_TOKENS)[None]


def _quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized linears by name. The GPTQ reference is a plain fp copy: its decoder-block linears (all that
    GPTQModel quantizes) stand for the quantized ones."""
    found = {n: m for n, m in model.named_modules() if is_quantized(m)}
    return found or {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def _weight(mod: nn.Module) -> torch.Tensor:
    w = dense_weight(mod)
    return (mod.weight if w is None else w).detach().float()


@torch.no_grad()
def roundtrip_error(reference: nn.Module, out: Path, fmt: str, params: Params) -> dict:
    """How far the checkpoint, loaded as the next stage loads it, is from the quantized model: weights (must be
    identical) and logits on a probe (kernel arithmetic, recorded)."""
    device = device_of(params.model)
    dtype = dtype_of(params.model, device)
    model, tok = load_base(out, fmt, params.model, device)
    loaded, expected = _quantized_linears(model), _quantized_linears(reference)
    if set(loaded) != set(expected):
        raise RuntimeError(f"quantize: the saved checkpoint quantizes {sorted(set(loaded) ^ set(expected))[:3]} "
                           f"differently from the quantized model")
    # one linear at a time, on the loaded model's device, one host sync at the end (on the host: 9 s of a 1B model);
    # before any forward: CPU TorchFusedLinear repacks its weights on the first one
    diffs = []
    for n, mod in loaded.items():
        w = _weight(mod)
        diffs.append((w - _weight(expected[n]).to(w.device)).abs().max())
    weight_diff = torch.stack(diffs).max().item()
    if (out / EMBED_INT8).is_file():  # the int8 embedding must come back exactly too
        emb = model.get_input_embeddings().weight
        ref_emb = reference.get_input_embeddings().weight.to(device=emb.device, dtype=emb.dtype)
        weight_diff = max(weight_diff, (emb.float() - ref_emb.float()).abs().max().item())
    ids = probe_ids(tok, params).to(device)
    if fmt not in ("nf4", "int8"):  # the dequantized GPTQ copy: compute it as the loaded model does
        reference = reference.to(device=device, dtype=dtype)
    ref = reference(ids).logits.float()
    diff = (model(ids).logits.float() - ref).abs().max().item()
    return {"weights_max_abs_diff": weight_diff, "max_abs_logit_diff": diff,
            "relative_logit_diff": diff / ref.abs().max().item(), "dtype": str(dtype)}


def quantize(src: Path, cfg: QuantMethodCfg, out: Path, params: Params) -> dict:
    """Quantize the base weights of `src` (its own, or the ones a PEFT node references). PEFT parts (LoRA under a ptq
    stage; adapters / prompt / prefix after a merge) are copied beside the quantized base and stay fp32. GPTQ's
    calibration on such a node follows cfg.calibration (see gptq())."""
    fmt = storage_format(cfg)
    t0 = time.perf_counter()
    reference = METHODS[cfg.method](src, cfg, out, params)
    if cfg.embeddings == "int8":
        store_int8_embedding(reference, out)
    t1 = time.perf_counter()
    err = roundtrip_error(reference, out, fmt, params)
    if not err["weights_max_abs_diff"] == 0:  # `not ==` also catches NaN
        raise RuntimeError(f"quantize {cfg.method}: the saved checkpoint's weights are up to "
                           f"{err['weights_max_abs_diff']:.3g} away from the quantized model's; it does not load back as "
                           f"quantized")
    peft = artifact.peft_dir(src)
    if peft.is_dir():
        shutil.copytree(peft, artifact.peft_dir(out), ignore=shutil.ignore_patterns("seeds"))
    seconds = {"quantize_and_save": round(t1 - t0, 2), "roundtrip_check": round(time.perf_counter() - t1, 2)}
    return {"format": fmt, "weights": ".", "roundtrip": err, "seconds": seconds}


def run(src: Path, cfg: QuantizeCfg, out: Path, params: Params) -> dict:
    return quantize(src, cfg, out, params)
