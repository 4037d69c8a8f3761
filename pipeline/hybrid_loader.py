"""Load an exported node with plain libraries: torch, transformers, safetensors; peft when the export has lora/;
bitsandbytes (NF4) or optimum + gptqmodel (GPTQ) when its weights are quantized (its README.md says which).

`python -m pipeline export NODE DIR` copies this file into DIR as hybrid_loader.py when the node keeps bottleneck
adapters or a soft prompt: the parts transformers and peft lack. It re-creates them exactly as the pipeline that
trained them runs them (an adapter h + up(act(down(h))) on the output of each decoder layer's MLP, as a forward
hook; a soft prompt prepended to the input embeddings) and imports nothing of that pipeline, so it must not: it is
the deployable copy of pipeline/adapters.py, checked against it by tests/test_export.py.

    import sys; sys.path.insert(0, "DIR")
    import hybrid_loader
    model, tokenizer, hybrid = hybrid_loader.load("DIR")                 # hybrid is None without adapters / prompt
    ids = tokenizer("To be, or not", return_tensors="pt", add_special_tokens=False).input_ids
    logits = hybrid_loader.logits(model, hybrid, ids)                     # [1, len(ids), vocab]: real tokens only
    print(hybrid_loader.generate(model, tokenizer, hybrid, "To be, or not", max_new_tokens=20))
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

HYBRID_DIR = "hybrid"
CONFIG = "hybrid.json"
WEIGHTS = "hybrid.safetensors"
KNOWN_PARTS = {"hidden", "n_layers", "adapter_dim", "prompt_tokens", "adapter_act"}


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


class Hybrid(nn.Module):
    """Bottleneck adapters (one per decoder layer) and / or a soft prompt, read from DIR/hybrid/."""

    def __init__(self, hidden: int, n_layers: int, adapter_dim: int | None = None, prompt_tokens: int | None = None,
                 adapter_act: str = "gelu"):
        super().__init__()
        self.adapters = (nn.ModuleList(BottleneckAdapter(hidden, adapter_dim, adapter_act) for _ in range(n_layers))
                         if adapter_dim else None)
        self.prompt = nn.Parameter(torch.zeros(prompt_tokens, hidden)) if prompt_tokens else None
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


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, **from_pretrained):
    """(model, tokenizer, hybrid) from an export dir: base weights (fp, NF4 or GPTQ), LoRA (peft), then the hybrid
    parts, attached. fp32 is the dtype the pipeline evaluated in on CPU; pass torch.bfloat16 on a GPU to save memory.
    Other keyword arguments go to AutoModelForCausalLM.from_pretrained (e.g. a GPTQConfig picking the kernel)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    info = json.loads((path / "export.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(path)
    quantized = info["format"] in ("nf4", "gptq")  # placed at load time by bitsandbytes / gptqmodel
    placed = {"device_map": {"": device}} if quantized else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placed, **from_pretrained)
    if not quantized:
        model.to(device)
    if (path / "lora").is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path / "lora")
    hybrid = None
    if (path / HYBRID_DIR / CONFIG).is_file():
        hybrid = Hybrid.from_dir(path / HYBRID_DIR).to(device)
        hybrid.attach(model)
    return model.eval(), tokenizer, hybrid


def embeds(model: nn.Module, hybrid: Hybrid | None, ids: torch.Tensor) -> torch.Tensor:
    emb = model.get_input_embeddings()(ids)
    return hybrid.prepend_prompt(emb) if hybrid is not None else emb


@torch.no_grad()
def logits(model: nn.Module, hybrid: Hybrid | None, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the real tokens (the soft-prompt positions dropped)."""
    out = model(inputs_embeds=embeds(model, hybrid, ids), use_cache=False).logits
    return out[:, hybrid.n_prompt if hybrid is not None else 0:]


@torch.no_grad()
def generate(model: nn.Module, tokenizer, hybrid: Hybrid | None, text: str, max_new_tokens: int = 32, **kwargs) -> str:
    """Greedy continuation of `text` (pass generate() kwargs to sample); the soft prompt goes in front of it."""
    device = model.get_input_embeddings().weight.device
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    e = embeds(model, hybrid, ids)
    mask = torch.ones(e.shape[:2], dtype=torch.long, device=device)
    kwargs.setdefault("do_sample", False)
    out = model.generate(inputs_embeds=e, attention_mask=mask, max_new_tokens=max_new_tokens, **kwargs)
    return tokenizer.decode(out[0], skip_special_tokens=True)  # with inputs_embeds only, generate returns new tokens
