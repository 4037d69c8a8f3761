"""Plan-time checks: everything that can be known before work starts, each failure one line naming the field or
file and the fix. Run by every CLI command after the params parse and the orderings plan.

Shapes come from the model's config (read, never loaded): a GPTQ group or an N:M width that does not divide a
layer's in_features, or a LoRA target the model lacks, would otherwise fail minutes into a stage.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .config import CorpusCfg, ModelCfg, Params, PeftCfg, PruneCfg, QuantMethodCfg
from .plan import Plan, PlanError

MAX_NODE_NAME = 200  # bytes; file names are <= 255 and a node's temp dir adds '.<name>.tmp-<pid>'
# The embedded default (SmolLM2-135M-Instruct, a Llama): its config, so that plan-time checks need no download.
DEFAULT_CONFIG = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                  "num_key_value_heads": 3, "num_hidden_layers": 30, "vocab_size": 49152, "head_dim": 64,
                  "tie_word_embeddings": True}


def model_config(source: str) -> dict:
    from .models import DEFAULT_MODEL

    if source == DEFAULT_MODEL:
        return DEFAULT_CONFIG
    path = Path(source) / "config.json"
    if not path.is_file():
        raise PlanError(f"model.source: {source} is not a Hugging Face model dir (no config.json); "
                        f"give a local model dir or '{DEFAULT_MODEL}'")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: not valid JSON ({exc}); fix or replace the model dir") from None


@lru_cache(maxsize=8)
def _block_linears(config_json: str) -> dict[str, int]:
    """Name (inside a decoder layer) -> in_features of every linear layer, from a model built on the meta device."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads(config_json)
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    config.num_hidden_layers = 1  # one layer tells the shapes of all
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    from .adapters import decoder_layers

    return {n: m.in_features for n, m in decoder_layers(model)[0].named_modules() if isinstance(m, nn.Linear)}


def block_linears(config: dict) -> dict[str, int]:
    return _block_linears(json.dumps(config, sort_keys=True))


def _check_corpus(name: str, corpus: CorpusCfg) -> None:
    for f in corpus.files.split(","):
        path = Path(f.strip())
        if not path.is_file():
            raise PlanError(f"data.{name}.files: {path} not found (relative to the params file's directory); fix the path")
        head = path.open("rb").read(8192)
        if not head.strip():
            raise PlanError(f"data.{name}.files: {path} is empty; point it at a file with text")
        if b"\0" in head:
            raise PlanError(f"data.{name}.files: {path} looks binary (NUL bytes); give a text or JSON-lines file")
        if corpus.format == "json":
            first = head.split(b"\n", 1)[0].strip()
            try:
                record = json.loads(first) if first.startswith(b"{") else json.loads(path.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise PlanError(f"data.{name}.files: {path} is not JSON / JSON lines; fix the file or set format: text") from None
            record = record[0] if isinstance(record, list) and record else record
            for field in corpus.fields:  # a templated domain needs its instruction / input / output fields
                if not isinstance(record, dict) or field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    key = "field" if field == corpus.field else next(k for k, v in corpus.model_dump().items()
                                                                       if k.endswith("_field") and v == field)
                    raise PlanError(f"data.{name}.{key}: {path} has no field '{field}' (has {keys}); set {key}:")


def _check_device(device: str) -> None:
    import torch

    if device in ("auto", "cpu"):
        return
    if not device.startswith("cuda"):
        raise PlanError(f"model.device: {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise PlanError(f"model.device: {device} asked for but no CUDA GPU is visible; use device: auto (or cpu)")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise PlanError(f"model.device: {device}: only {torch.cuda.device_count()} GPU(s) visible; use a lower index")


@lru_cache(maxsize=32)
def _kernel_for(bits: int, group_size: int, sym: bool, desc_act: bool, device: str, backend: str) -> str:
    """The GPTQModel kernel a GPTQ checkpoint of these settings loads with (what transformers' GPTQ quantizer asks
    GPTQModel for: `hf_select_quant_linear_v2`, dtype unspecified); raises ValueError when none can."""
    from gptqmodel.utils.importer import hf_select_quant_linear_v2

    return hf_select_quant_linear_v2(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, format="gptq",
                                     quant_method="gptq", device_map={"": device}, backend=backend,
                                     pack=False).__name__


def _check_gptq_kernel(cname: str, cfg: QuantMethodCfg, model: ModelCfg) -> None:
    """A GPTQ / RTN setting no installed kernel can load on the target device fails here, not after quantizing."""
    import torch

    device = "cuda" if model.device.startswith("cuda") or model.device == "auto" and torch.cuda.is_available() else "cpu"
    # load_base asks for model.gptq_kernel on GPU and lets GPTQModel choose on CPU
    backend = model.gptq_kernel if device == "cuda" else "auto"
    try:
        kernel = _kernel_for(cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act, device, backend)
    except (ValueError, NotImplementedError, TypeError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        fix = ("use bits 2, 4 or 8, or model.gptq_kernel: torch (slower, all bits)" if device == "cuda" and cfg.bits == 3
               else "change bits / group_size / sym / desc_act" + (", or model.gptq_kernel" if device == "cuda" else ""))
        raise PlanError(f"stages.{cname}.bits: no installed GPTQModel kernel loads bits={cfg.bits} group_size="
                        f"{cfg.group_size} sym={cfg.sym} desc_act={cfg.desc_act} on {device} with backend {backend} "
                        f"({reason}); {fix}") from None
    if kernel == "TorchFusedLinear" and not cfg.sym:
        # measured: weights dequantize exactly, but its forward is off by ~85% of the logit range (GPTQModel 7.6)
        raise PlanError(f"stages.{cname}.sym: GPTQModel 7.6 loads 4-bit per-channel (group_size -1) checkpoints on CPU "
                        f"with TorchFusedLinear, which computes wrong logits for asymmetric ones; use sym: true or a "
                        f"group_size such as 64")


def check(params: Params, plan: Plan, for_node: str | None = None) -> None:
    """Raise PlanError (one line) for anything that would fail once work has started. `for_node`: only its chain's
    GPTQ kernels are looked up (importing GPTQModel takes ~12 s on 2 cores: every DVC stage process would pay it)."""
    ev = params.evaluate
    if ev.seq_len > ev.max_tokens:
        raise PlanError(f"evaluate.seq_len: {ev.seq_len} is more than evaluate.max_tokens {ev.max_tokens}, so no window "
                        f"fits; raise max_tokens or lower seq_len")
    for name, node in plan.nodes.items():
        if len(name.encode()) > MAX_NODE_NAME:
            raise PlanError(f"ordering '{node.orderings[0]}': node name is {len(name.encode())} bytes (limit "
                            f"{MAX_NODE_NAME}: it names a directory); use shorter stage config names")
    _check_device(params.model.device)
    for name, corpus in [("calibration", params.data.calibration), ("domain", params.data.domain),
                         *((f"eval.{k}", v) for k, v in params.data.eval.items())]:
        _check_corpus(name, corpus)
    used = set(plan.nodes[for_node].chain) if for_node in plan.nodes else {c for ch in params.orderings.values() for c in ch}
    for cname in sorted(used):
        cfg = params.stages[cname]
        if isinstance(cfg, QuantMethodCfg) and cfg.method in ("gptq", "rtn"):
            _check_gptq_kernel(cname, cfg, params.model)
    base_config = model_config(params.model.source)
    for cname in sorted({c for chain in params.orderings.values() for c in chain}):
        cfg = params.stages[cname]
        if isinstance(cfg, QuantMethodCfg) and cfg.method in ("gptq", "rtn") and cfg.bits == 4 and cfg.group_size == -1:
            import torch

            odd = sorted({f for f in block_linears(base_config).values() if f not in (32, 64, 128, 256)})
            on_cpu = params.model.device == "cpu" or params.model.device == "auto" and not torch.cuda.is_available()
            if odd and on_cpu:  # measured: the checkpoint loads, its first forward raises (GPTQModel 7.6, torch 2.13)
                raise PlanError(f"stages.{cname}.group_size: 4-bit per-channel on CPU runs through torch's int4pack "
                                f"kernel, which takes groups of 32, 64, 128 or 256 only, and this model has in_features "
                                f"{odd}; use group_size 64, or run on a GPU")
    checked: set[tuple[str, str]] = set()
    for oname, chain in params.orderings.items():
        config, shrunk_by = base_config, None  # a structured prune changes the shapes every later stage sees
        for cname in chain:
            cfg = params.stages[cname]
            key = (cname, json.dumps(config, sort_keys=True))
            if key not in checked:
                checked.add(key)
                _check_stage(cname, cfg, config, shrunk_by)
            if isinstance(cfg, PruneCfg) and cfg.structured:
                from .stages.prune import structured_sizes

                config, shrunk_by = {**config, **structured_sizes(config, cfg)}, cname


STRUCTURED_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj", "self_attn.k_proj",
                      "self_attn.v_proj", "self_attn.o_proj")


def _check_stage(cname: str, cfg, config: dict, shrunk_by: str | None) -> None:
    """One stage config against the model config it will see (the base's, or the one after a structured prune)."""
    after = f" (after the structured prune {shrunk_by})" if shrunk_by else ""
    if isinstance(cfg, PruneCfg) and cfg.structured:
        missing = [n for n in STRUCTURED_LINEARS if n not in block_linears(config)]
        if missing or "intermediate_size" not in config:
            raise PlanError(f"stages.{cname}.pattern: structured pruning needs a gated MLP and q/k/v/o projections "
                            f"(Llama, Mistral, Qwen); this model lacks {missing or ['intermediate_size']}; use an "
                            f"unstructured or N:M pattern")
        from .stages.prune import structured_sizes

        try:
            structured_sizes(config, cfg)
        except ValueError as exc:
            raise PlanError(f"stages.{cname}.{exc}{after}") from None
    if isinstance(cfg, PruneCfg) and cfg.nm or isinstance(cfg, QuantMethodCfg) and cfg.method in ("gptq", "rtn"):
        linears = block_linears(config)
        width, what = ((cfg.nm[1], f"the group of {cfg.nm[1]} of pattern {cfg.pattern}") if isinstance(cfg, PruneCfg)
                       else (cfg.group_size, f"group_size {cfg.group_size}"))
        field = "pattern" if isinstance(cfg, PruneCfg) else "group_size"
        bad = {n: f for n, f in linears.items() if width > 0 and f % width}
        if bad:
            n, f = next(iter(bad.items()))
            divisors = sorted({d for d in (32, 64, 128) if all(v % d == 0 for v in linears.values())})
            hint = f"; e.g. {divisors[-1]}" if divisors and field == "group_size" else ""
            raise PlanError(f"stages.{cname}.{field}: {what} does not divide in_features {f} of {n}{after}; use a "
                            f"width that divides every layer's in_features {sorted(set(linears.values()))}{hint}")
    if isinstance(cfg, PeftCfg) and "lora" in cfg.methods:
        names = {n.rsplit(".", 1)[-1] for n in block_linears(config)}
        missing = [t for t in cfg.lora_targets if t not in names]
        if missing:
            raise PlanError(f"stages.{cname}.lora_targets: {missing} not in the model; its linear layers are "
                            f"{sorted(names)}")
