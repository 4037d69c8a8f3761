"""Load an exported node with plain libraries: torch, transformers, safetensors; peft when the export has lora/;
bitsandbytes (NF4) or optimum + gptqmodel (GPTQ) when its weights are quantized (its README.md says which).

`python -m pipeline export NODE DIR` copies this file into DIR as hybrid_loader.py when the node keeps bottleneck
adapters, a soft prompt or a prefix: the parts transformers and peft lack. It re-creates them exactly as the
pipeline that trained them runs them (an adapter h + up(act(down(h))) on the output of each decoder layer's MLP, as
a forward hook; a soft prompt prepended to the input embeddings; a prefix as a KV cache pre-filled with its keys and
values, which the sequence follows at positions P..) and imports nothing of that pipeline, so it must not: it is
the deployable copy of pipeline/adapters.py, checked against it by tests/test_export.py.

    import sys; sys.path.insert(0, "DIR")
    import hybrid_loader
    model, tokenizer, hybrid = hybrid_loader.load("DIR")                 # hybrid is None without adapters / prompt
    ids = tokenizer("To be, or not", return_tensors="pt", add_special_tokens=False).input_ids
    logits = hybrid_loader.logits(model, hybrid, ids)                     # [1, len(ids), vocab]: real tokens only
    print(hybrid_loader.generate(model, tokenizer, hybrid, "To be, or not", max_new_tokens=20))
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

HYBRID_DIR = "hybrid"
CONFIG = "hybrid.json"
WEIGHTS = "hybrid.safetensors"
EMBED_INT8 = "embed_int8.safetensors"  # an int8 input embedding (ptq / quantize with embeddings: int8)
KNOWN_PARTS = {"hidden", "n_layers", "adapter_dim", "prompt_tokens", "adapter_act", "prefix_tokens", "prefix_shape",
               "prefix_mlp"}  # prefix_mlp is always null in a saved node: the pipeline folds the MLP on save


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of an HF causal LM (Llama, Mistral, Qwen ...), under a peft PeftModel too."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.endswith("layers"):
            return module
    raise ValueError(f"{type(model).__name__}: found no ModuleList of {n} decoder layers")


class BottleneckAdapter(nn.Module):
    """h + up(act(down(h))); act 'linear' has no activation and no biases."""

    def __init__(self, hidden: int, dim: int, act: str = "gelu"):
        super().__init__()
        bias = act != "linear"
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.Identity() if act == "linear" else nn.GELU()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


class Prefix(nn.Module):
    """Prefix tuning's keys and values, kv [n_layers, 2 (key, value), kv_heads, tokens, head_dim]."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, tokens: int):
        super().__init__()
        self.kv = nn.Parameter(torch.zeros(n_layers, 2, kv_heads, tokens, head_dim))

    def cache(self, batch: int, config, dtype: torch.dtype):
        """A DynamicCache holding the prefix in every layer; the forward that uses it grows it: one per call."""
        from transformers import DynamicCache

        kv = self.kv.to(dtype)
        cache = DynamicCache(config=config)
        for i in range(kv.shape[0]):
            cache.update(kv[i, 0].unsqueeze(0).expand(batch, -1, -1, -1), kv[i, 1].unsqueeze(0).expand(batch, -1, -1, -1), i)
        return cache


class Hybrid(nn.Module):
    """Bottleneck adapters (one per decoder layer), a soft prompt and / or a prefix, read from DIR/hybrid/."""

    def __init__(self, hidden: int, n_layers: int, adapter_dim: int | None = None, prompt_tokens: int | None = None,
                 adapter_act: str = "gelu", prefix_tokens: int | None = None, prefix_shape: list[int] | None = None,
                 prefix_mlp: None = None):
        super().__init__()
        self.adapters = (nn.ModuleList(BottleneckAdapter(hidden, adapter_dim, adapter_act) for _ in range(n_layers))
                         if adapter_dim else None)
        self.prompt = nn.Parameter(torch.zeros(prompt_tokens, hidden)) if prompt_tokens else None
        self.prefix = Prefix(prefix_shape[0], prefix_shape[1], prefix_shape[2], prefix_tokens) if prefix_tokens else None
        self._hooks: list = []

    @classmethod
    def from_dir(cls, directory: Path) -> "Hybrid":
        cfg = json.loads((Path(directory) / CONFIG).read_text())
        unknown = sorted(k for k, v in cfg.items() if k not in KNOWN_PARTS and v)
        if unknown:  # a newer pipeline's part this copy cannot run: refuse rather than silently drop it
            raise ValueError(f"{directory / CONFIG}: parts {unknown} are unknown to this hybrid_loader.py; "
                             f"export the node again with the pipeline version that built it")
        hybrid = cls(**{k: v for k, v in cfg.items() if k in KNOWN_PARTS})
        hybrid.load_state_dict(load_file(Path(directory) / WEIGHTS))  # strict: every tensor must match
        return hybrid.eval()

    @property
    def n_prompt(self) -> int:
        return 0 if self.prompt is None else self.prompt.shape[0]

    def attach(self, model: nn.Module) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.adapters is not None:
            for layer, adapter in zip(decoder_layers(model), self.adapters):
                self._hooks.append(layer.mlp.register_forward_hook(lambda _m, _i, out, a=adapter: a(out)))

    def prepend_prompt(self, embeds: torch.Tensor) -> torch.Tensor:
        if self.prompt is None:
            return embeds
        p = self.prompt.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        return torch.cat([p, embeds], dim=1)


@torch.no_grad()
def load_int8_embedding(model: nn.Module, weights_dir: str | Path) -> bool:
    """Put the int8 input embedding stored beside the weights (EMBED_INT8: int8 `codes` [vocab, hidden], one float16
    `scale` per row; weight = codes * scale) into `model`, whose checkpoint then lacks that tensor: transformers
    leaves it randomly initialised, so a model loaded without this scores nothing like the node. A tied lm_head is
    the same tensor and follows. Returns whether there was one."""
    f = Path(weights_dir) / EMBED_INT8
    if not f.is_file():
        return False
    parts = load_file(f)
    emb = model.get_input_embeddings().weight
    emb.data = (parts["codes"].float() * parts["scale"].float()[:, None]).to(device=emb.device, dtype=emb.dtype)
    return True


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, **from_pretrained):
    """(model, tokenizer, hybrid) from an export dir: base weights (fp, NF4 or GPTQ), LoRA (peft), then the hybrid
    parts, attached. fp32 is the dtype the pipeline evaluated in on CPU; pass torch.bfloat16 on a GPU to save memory.
    Other keyword arguments go to AutoModelForCausalLM.from_pretrained (e.g. a GPTQConfig picking the kernel)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    info = json.loads((path / "export.json").read_text())
    remote = from_pretrained.pop("trust_remote_code", False)  # off unless the caller asks: it runs code from DIR
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
    quantized = info["format"] in ("nf4", "int8", "gptq")  # placed at load time by bitsandbytes / gptqmodel
    placed = {"device_map": {"": device}} if quantized else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=remote, **placed, **from_pretrained)
    if not quantized:
        model.to(device)
    load_int8_embedding(model, path)
    if (path / "lora").is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path / "lora")
    hybrid = None
    if (path / HYBRID_DIR / CONFIG).is_file():
        hybrid = Hybrid.from_dir(path / HYBRID_DIR).to(device)
        hybrid.attach(model)
    return model.eval(), tokenizer, hybrid


def _with_prefix(model: nn.Module, hybrid: Hybrid | None, batch: int, dtype: torch.dtype) -> dict:
    """forward() kwargs that put the prefix cache in front of a new sequence (none without a prefix)."""
    if hybrid is None or hybrid.prefix is None:
        return {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers 5.24 renamed forward's past_key_values to cache (the old name warns)
    name = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
    return {name: hybrid.prefix.cache(batch, base.config, dtype)}


def embeds(model: nn.Module, hybrid: Hybrid | None, ids: torch.Tensor) -> torch.Tensor:
    emb = model.get_input_embeddings()(ids)
    return hybrid.prepend_prompt(emb) if hybrid is not None else emb


@torch.no_grad()
def logits(model: nn.Module, hybrid: Hybrid | None, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the real tokens (the soft-prompt positions dropped)."""
    e = embeds(model, hybrid, ids)
    out = model(inputs_embeds=e, use_cache=False, **_with_prefix(model, hybrid, e.shape[0], e.dtype)).logits
    return out[:, hybrid.n_prompt if hybrid is not None else 0:]


@torch.no_grad()
def generate(model: nn.Module, tokenizer, hybrid: Hybrid | None, text: str, max_new_tokens: int = 32, **kwargs) -> str:
    """Greedy continuation of `text` (pass generate() kwargs to sample); the soft prompt goes in front of it."""
    device = model.get_input_embeddings().weight.device
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    e = embeds(model, hybrid, ids)
    if hybrid is not None and hybrid.prefix is not None:  # a greedy loop over the prefix cache (generate() would
        kw = _with_prefix(model, hybrid, 1, e.dtype)        # treat the cached prefix as part of the input)
        (name, past), new = next(iter(kw.items())), []
        out = model(inputs_embeds=e, use_cache=True, **{name: past})
        for _ in range(max_new_tokens):
            new.append(out.logits[:, -1].argmax(-1, keepdim=True))
            out = model(input_ids=new[-1], use_cache=True, **{name: out.past_key_values})
        return tokenizer.decode(torch.cat(new, dim=1)[0], skip_special_tokens=True)
    mask = torch.ones(e.shape[:2], dtype=torch.long, device=device)
    kwargs.setdefault("do_sample", False)
    out = model.generate(inputs_embeds=e, attention_mask=mask, max_new_tokens=max_new_tokens, **kwargs)
    return tokenizer.decode(out[0], skip_special_tokens=True)  # with inputs_embeds only, generate returns new tokens
