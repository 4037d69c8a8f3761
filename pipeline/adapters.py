"""The hybrid-PEFT parts peft 0.21 lacks: a bottleneck adapter after each MLP and a soft prompt.

LoRA stays in peft (PeftModel). These parts live beside the HF model, not inside it: the adapters are forward
hooks on each decoder layer's `mlp`, so the base model's state dict (and its save_pretrained / quantized
formats) never changes, and the same code works over fp32, sparse, NF4 and GPTQ bases.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG = "hybrid.json"
WEIGHTS = "hybrid.safetensors"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of any HF causal LM (Llama, Mistral, Qwen ...), under a PeftModel too."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.endswith("layers"):
            return module
    raise ValueError(f"{type(model).__name__}: found no ModuleList of {n} decoder layers")


class BottleneckAdapter(nn.Module):
    """Houlsby-style bottleneck h + up(act(down(h))); `up` starts at zero so training starts from the base model.

    act="linear": no activation and no biases, so h + U D h = (I + U D) h is a linear map that merge folds exactly
    into the MLP's last projection (a Llama down_proj has no bias to absorb U d + u unless config.mlp_bias)."""

    def __init__(self, hidden: int, dim: int, act: str = "gelu"):
        super().__init__()
        bias = act != "linear"
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.Identity() if act == "linear" else nn.GELU()
        nn.init.zeros_(self.up.weight)
        if bias:
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


class Hybrid(nn.Module):
    """Bottleneck adapters (one per decoder layer) and/or a soft prompt of `prompt_tokens` virtual tokens."""

    def __init__(self, hidden: int, n_layers: int, adapter_dim: int | None, prompt_tokens: int | None,
                 init_prompt: torch.Tensor | None = None, adapter_act: str = "gelu"):
        super().__init__()
        self.cfg = {"hidden": hidden, "n_layers": n_layers, "adapter_dim": adapter_dim, "prompt_tokens": prompt_tokens,
                    "adapter_act": adapter_act}
        self.adapters = (nn.ModuleList(BottleneckAdapter(hidden, adapter_dim, adapter_act) for _ in range(n_layers))
                         if adapter_dim else None)
        if prompt_tokens:
            # initialised from real token embeddings: trains faster than random vectors (Lester et al. 2021)
            init = init_prompt if init_prompt is not None else torch.randn(prompt_tokens, hidden) * 0.02
            self.prompt = nn.Parameter(init.detach().clone().float())
        else:
            self.prompt = None
        self._hooks: list = []

    @property
    def methods(self) -> list[str]:
        return (["adapter"] if self.adapters is not None else []) + (["prompt"] if self.prompt is not None else [])

    @property
    def n_prompt(self) -> int:
        return 0 if self.prompt is None else self.prompt.shape[0]

    def attach(self, model: nn.Module) -> None:
        self.detach()
        if self.adapters is None:
            return
        for layer, adapter in zip(decoder_layers(model), self.adapters):
            self._hooks.append(layer.mlp.register_forward_hook(lambda _m, _i, out, a=adapter: a(out)))

    @property
    def foldable(self) -> bool:
        """Linear adapters: merge can fold them into the base weights."""
        return self.adapters is not None and self.cfg.get("adapter_act") == "linear"

    def drop_adapters(self, model: nn.Module) -> None:
        """Remove the adapters (after merge folded them into `model`); the other parts stay attached."""
        self.detach()
        self.adapters = None
        self.cfg["adapter_dim"] = None
        self.attach(model)

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def prepend_prompt(self, embeds: torch.Tensor) -> torch.Tensor:
        if self.prompt is None:
            return embeds
        p = self.prompt.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        return torch.cat([p, embeds], dim=1)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG).write_text(json.dumps(self.cfg, indent=2) + "\n")
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}, directory / WEIGHTS)

    @classmethod
    def load(cls, directory: Path) -> "Hybrid":
        directory = Path(directory)
        cfg = json.loads((directory / CONFIG).read_text())
        hybrid = cls(**cfg)
        hybrid.load_state_dict(load_file(directory / WEIGHTS))
        return hybrid

    @staticmethod
    def exists(directory: Path) -> bool:
        return (Path(directory) / CONFIG).is_file()
