"""The hybrid-PEFT parts peft 0.21 lacks or cannot combine: a bottleneck adapter after each MLP, a soft prompt and
prefix tuning.

LoRA stays in peft (PeftModel). These parts live beside the HF model, not inside it: the adapters are forward
hooks on each decoder layer's `mlp`, the prefix is a pre-filled KV cache (`Prefix.cache`), so the base model's state
dict (and its save_pretrained / quantized formats) never changes, and the same code works over fp32, sparse, NF4
and GPTQ bases.

Why not peft's PrefixTuningConfig: under peft 0.21 + transformers 5.24 its prefix is ignored by `generate()` (measured
on the tiny Llama: greedy generation with a large random prefix gave the base model's tokens, while forward() and a
token-by-token greedy loop through forward() gave others), and peft cannot put it in one PeftModel with LoRA.
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


class Prefix(nn.Module):
    """Prefix tuning (Li & Liang 2021): `tokens` learned key and value vectors in every attention layer, in the KV-head
    layout the cache holds (GQA: num_key_value_heads heads, not num_attention_heads).

    Plain: one parameter kv [n_layers, 2 (key, value), kv_heads, tokens, head_dim]. Reparametrized (`mlp_dim`, the
    paper's training trick against unstable optimisation): kv = MLP(embedding) of a [tokens, hidden] embedding, as
    peft's PrefixEncoder; Hybrid.save stores its output, the plain form. The keys are used as given (after the rotary
    embedding): the prefix fills positions 0..P-1 and the sequence follows it (LM.forward)."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, tokens: int, hidden: int,
                 mlp_dim: int | None = None, init_kv: torch.Tensor | None = None):
        super().__init__()
        self.shape = (n_layers, 2, kv_heads, tokens, head_dim)
        if mlp_dim:
            self.embedding = nn.Parameter(torch.randn(tokens, hidden))  # nn.Embedding's N(0, 1), as peft
            self.mlp = nn.Sequential(nn.Linear(hidden, mlp_dim), nn.Tanh(),
                                     nn.Linear(mlp_dim, n_layers * 2 * kv_heads * head_dim))
            self.kv = None
        else:
            init = init_kv if init_kv is not None else torch.randn(self.shape) * 0.02
            self.kv = nn.Parameter(init.detach().clone().float().reshape(self.shape))

    @property
    def tokens(self) -> int:
        return self.shape[3]

    def kv_tensor(self) -> torch.Tensor:
        """[n_layers, 2, kv_heads, tokens, head_dim]"""
        if self.kv is not None:
            return self.kv
        n_layers, _, kv_heads, tokens, head_dim = self.shape
        out = self.mlp(self.embedding).view(tokens, n_layers, 2, kv_heads, head_dim)
        return out.permute(1, 2, 3, 0, 4)

    def cache(self, batch: int, config, dtype: torch.dtype):
        """A transformers DynamicCache holding the prefix in every layer (the keys and values of `tokens` earlier
        positions), for `batch` sequences; differentiable, so a forward on it trains the prefix. A cache is grown in
        place by the forward that uses it: build one per sequence (batch)."""
        from transformers import DynamicCache

        kv = self.kv_tensor().to(dtype)
        cache = DynamicCache(config=config)
        for i in range(kv.shape[0]):
            cache.update(kv[i, 0].unsqueeze(0).expand(batch, -1, -1, -1),
                         kv[i, 1].unsqueeze(0).expand(batch, -1, -1, -1), i)
        return cache


class Hybrid(nn.Module):
    """Bottleneck adapters (one per decoder layer), a soft prompt of `prompt_tokens` virtual tokens and / or a prefix of
    `prefix_tokens` key/value vectors per layer (`prefix_shape` = [n_layers, kv_heads, head_dim]; `prefix_mlp` = the
    hidden width of its training-time MLP, None once folded)."""

    def __init__(self, hidden: int, n_layers: int, adapter_dim: int | None, prompt_tokens: int | None,
                 init_prompt: torch.Tensor | None = None, prefix_tokens: int | None = None,
                 prefix_shape: list[int] | None = None, prefix_mlp: int | None = None,
                 init_prefix: torch.Tensor | None = None, adapter_act: str = "gelu"):
        super().__init__()
        self.cfg = {"hidden": hidden, "n_layers": n_layers, "adapter_dim": adapter_dim, "prompt_tokens": prompt_tokens,
                    "prefix_tokens": prefix_tokens, "prefix_shape": list(prefix_shape) if prefix_shape else None,
                    "prefix_mlp": prefix_mlp, "adapter_act": adapter_act}
        self.adapters = (nn.ModuleList(BottleneckAdapter(hidden, adapter_dim, adapter_act) for _ in range(n_layers))
                         if adapter_dim else None)
        if prompt_tokens:
            # initialised from real token embeddings: trains faster than random vectors (Lester et al. 2021)
            init = init_prompt if init_prompt is not None else torch.randn(prompt_tokens, hidden) * 0.02
            self.prompt = nn.Parameter(init.detach().clone().float())
        else:
            self.prompt = None
        if prefix_tokens:
            if not prefix_shape:
                raise ValueError("Hybrid: prefix_tokens needs prefix_shape [n_layers, kv_heads, head_dim]")
            n_l, kv_heads, head_dim = prefix_shape
            self.prefix = Prefix(n_l, kv_heads, head_dim, prefix_tokens, hidden, prefix_mlp, init_prefix)
        else:
            self.prefix = None
        self._hooks: list = []

    @property
    def methods(self) -> list[str]:
        return ((["adapter"] if self.adapters is not None else []) + (["prompt"] if self.prompt is not None else [])
                + (["prefix"] if self.prefix is not None else []))

    @property
    def n_prompt(self) -> int:
        return 0 if self.prompt is None else self.prompt.shape[0]

    @property
    def n_prefix(self) -> int:
        return 0 if self.prefix is None else self.prefix.tokens

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
        """Config + fp32 weights; a reparametrized prefix is saved folded (its MLP output: what inference uses)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("prefix.")}
        if self.prefix is not None:
            with torch.no_grad():
                state["prefix.kv"] = self.prefix.kv_tensor()
        (directory / CONFIG).write_text(json.dumps({**self.cfg, "prefix_mlp": None}, indent=2) + "\n")
        save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, directory / WEIGHTS)

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
