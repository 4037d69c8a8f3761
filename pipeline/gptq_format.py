"""The standard GPTQ checkpoint format, written from our own GPTQ pass through GPTQModel's packer and config.

GPTQModel's `TorchLinear.pack_block` packs the integers (it re-derives them from the dequantized weight, scales
and zero points, which our codes must reproduce exactly: checked here), and its `QuantizeConfig` writes
`quantization_config` in config.json and quantize_config.json as GPTQModel's own save does; transformers + GPTQModel
load the result like any GPTQ checkpoint. The packer holds true zero points (GPTQModel's "v2"); the `gptq`
checkpoint format stores zero - 1 ("v1"), which a load converts back, so the modules are converted before saving.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .config import QuantMethodCfg
from .gptq import Quantized

PRODUCER = "compress-pipeline:gptq"  # meta.quantizer beside the packer's: the integers are not GPTQModel's


def gptq_config(cfg: QuantMethodCfg, group_aware: bool = True):
    """GPTQModel's QuantizeConfig for a gptq / rtn stage config (every knob explicit: GPTQModel's defaults move);
    group_aware=False: no group-aware reordering (an ablation of our own pass)."""
    from gptqmodel import QuantizeConfig

    common = {"bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym,
              "offload_to_disk": False}  # offloaded modules are not readable back for the reference
    if cfg.method == "rtn":
        return QuantizeConfig(**common, desc_act=False, weight_only={"method": "rtn"})
    # GPTQModel 7.6 turns its group-aware reordering (GAR) on by default; it excludes act-order and needs groups
    gar = group_aware and not cfg.desc_act and cfg.group_size > 0
    return QuantizeConfig(**common, desc_act=cfg.desc_act, act_group_aware=gar, damp_percent=cfg.damp_percent,
                          true_sequential=cfg.true_sequential)


@torch.no_grad()
def pack(linear: nn.Linear, q: Quantized, cfg: QuantMethodCfg, name: str) -> nn.Module:
    """A GPTQModel TorchLinear holding `q` in the checkpoint's (v1) layout."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module

    # skip_init: the packer only reads the weights copied in (kaiming init of every linear: 5.5 s of a 1B model)
    src = nn.utils.skip_init(nn.Linear, linear.in_features, linear.out_features, bias=linear.bias is not None)
    src.weight.copy_(q.weight)
    if linear.bias is not None:
        src.bias.copy_(linear.bias)
    mod = TorchLinear(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, desc_act=cfg.desc_act,
                           in_features=linear.in_features, out_features=linear.out_features,
                           bias=linear.bias is not None, pack_dtype=torch.int32)
    mod.pack_block(src, q.scales.cpu(), q.zeros.cpu().to(torch.int32), q.g_idx.cpu())
    # post_init would torch.compile the module's dequantizer (inductor, per shape: 22 s for the first on a fresh
    # cache here, ~1.5 s each after; ~60 s of every GPTQ node on the H200's fresh machine), for one call below
    mod.optimized = True
    mod.post_init()
    if not torch.equal(mod.dequantize_weight().T.float(), q.weight.cpu()):
        raise RuntimeError(f"GPTQ packing: {name} does not unpack to the quantized weights")
    convert_gptq_v2_to_v1_format_module(mod, gptq_config(cfg))
    return mod


def save(reference: nn.Module, quantized: dict[str, Quantized], cfg: QuantMethodCfg, tokenizer, out: Path,
         dtype: torch.dtype, true_sequential: bool = True, group_aware: bool = True) -> None:
    """`reference` (an fp model holding the quantized weights) as a GPTQ checkpoint: each linear named in `quantized`
    packed, the rest (embeddings, norms, lm_head) in `dtype`, the model's compute dtype (as GPTQModel saves).
    true_sequential / group_aware: how the pass walked (metadata only: loading needs neither)."""
    from gptqmodel import __version__

    model = copy.deepcopy(reference).to(device="cpu", dtype=dtype)  # before packing: .to() would cast the scales
    model.config.dtype = dtype
    for name, q in quantized.items():
        model.set_submodule(name, pack(model.get_submodule(name), q, cfg, name))
    qcfg = gptq_config(cfg, group_aware)
    qcfg.meta_set_versionable("quantizer", [f"gptqmodel:{__version__}", PRODUCER])
    qcfg.meta_set("damp_percent", cfg.damp_percent)
    qcfg.meta_set("act_group_aware", qcfg.act_group_aware)
    qcfg.meta_set("static_groups", False)
    qcfg.meta_set("true_sequential", true_sequential)
    model.config.quantization_config = qcfg.to_dict()
    model.save_pretrained(out, safe_serialization=True)
    qcfg.save_pretrained(str(out))
    tokenizer.save_pretrained(out)
