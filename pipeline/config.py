"""Typed params: load and validate params.yaml. Every error names the field and the fix, in one line."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_RE = re.compile(r"[A-Za-z0-9_]+")  # DVC stage names allow only letters, digits, '_' and '-'; '-' joins chains
RESERVED_CORPORA = ("domain_heldout",)
ZEROSHOT_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "lambada_openai",
                  "openbookqa", "sst2")  # pipeline/zeroshot.py runs them; a test checks the two lists agree  # added by the pipeline itself: a user corpus of that name would be replaced


class ConfigError(ValueError):
    """A bad params file: the message is one line that names the field and the fix."""


class Strict(BaseModel):
    # inf / nan are never meaningful here (a lr of .inf trains to NaN): refuse them at load time
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelCfg(Strict):
    source: str = Field("smollm2-135m", description="'smollm2-135m' (the embedded default) or a local HF model dir")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="auto = cuda if available, else cpu")
    gptq_kernel: str = Field("triton", description="GPTQModel kernel for GPTQ checkpoints on GPU; 'auto' picks Machete on "
                             "Hopper, which JIT-builds after downloading CUTLASS (fails offline); triton needs no build")
    trust_remote_code: bool = False


class CorpusCfg(Strict):
    files: str = Field(description="local file(s) read with the datasets library, comma-separated")
    format: Literal["text", "json"] = "text"
    field: str = "text"
    read_as: Literal["document", "hf_rows"] = Field(
        "document", description="text files: 'document' = the file as it is; 'hf_rows' = the Hugging Face split's rows "
        "(lines keeping their newline, blank lines as '') joined by a blank line: the WikiText-2 perplexity convention "
        "of the GPTQ / SparseGPT / Wanda papers. JSON records are always joined by a blank line")

    @property
    def fields(self) -> tuple[str, ...]:
        """The JSON fields every record needs."""
        return (self.field,)


class CalibrationCfg(CorpusCfg):
    samples: int = Field(16, ge=1)
    seq_len: int = Field(256, ge=8)


class DomainCfg(CorpusCfg):
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    packing: Literal["auto", "documents", "stream"] = Field(
        "auto", description="how training sequences are cut: 'documents' = from one document each (a JSON record, or a "
        "blank-line separated block of a text file; the tail padded and masked out of the loss), never spanning two; "
        "'stream' = random windows of the corpus as one text. auto = documents for JSON and templated corpora, stream "
        "for plain text (a play or a book is one continuous text: its blank-line blocks are not independent documents, "
        "and padding short speeches would waste most of each window)")
    template: Literal["none", "alpaca"] = Field(
        "none", description="'alpaca': each JSON record is an instruction example rendered with the Stanford Alpaca "
        "prompt (with / without input); the loss and the held-out perplexity count the response tokens only")
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"

    @model_validator(mode="after")
    def _template_needs_json(self) -> "DomainCfg":
        if self.template != "none" and self.format != "json":
            raise ValueError(f"template: {self.template} reads JSON records; set format: json (or template: none)")
        if self.template != "none" and self.packing == "stream":
            raise ValueError("a templated domain is one example per sequence; drop packing: stream (or template: none)")
        return self

    @property
    def fields(self) -> tuple[str, ...]:
        if self.template != "none":
            return (self.instruction_field, self.input_field, self.output_field)
        return (self.field,)

    @property
    def by_documents(self) -> bool:
        """Training sequences cut from single documents (see `packing`)."""
        return self.packing == "documents" or (self.packing == "auto" and (self.format == "json" or self.template != "none"))


class DataCfg(Strict):
    calibration: CalibrationCfg
    domain: DomainCfg
    eval: dict[str, CorpusCfg] = Field(description="extra perplexity corpora, name -> corpus; the domain held-out split is always added")


class EvaluateCfg(Strict):
    seq_len: int = Field(512, ge=8, description="window length of the perplexity windows (non-overlapping)")
    max_tokens: int = Field(8192, ge=8, description="token budget per corpus; the remainder of the last window is dropped")
    batch_size: int = Field(8, ge=1, description="windows per forward pass (raise on GPU)")
    latency_prompt: int = Field(128, ge=1)
    latency_new_tokens: int = Field(64, ge=1)
    latency_repeats: int = Field(3, ge=1, description="timed runs after one warm-up; the median is reported")
    merge_check_windows: int = Field(2, ge=1, description="windows used to measure the merge error")
    zeroshot: dict[str, int | None] = Field(
        default_factory=dict, description="zero-shot tasks (lm-evaluation-harness over data/) -> items per node "
        "(a seeded sample, the same for every node; null = the full set): hellaswag, arc_easy, arc_challenge, piqa, "
        "winogrande, boolq, lambada_openai, openbookqa, sst2")
    zeroshot_batch_size: int = Field(8, ge=1, description="requests per forward in the zero-shot tasks")

    @field_validator("zeroshot")
    @classmethod
    def _tasks(cls, v: dict[str, int | None]) -> dict[str, int | None]:
        unknown = sorted(set(v) - set(ZEROSHOT_TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; use {', '.join(ZEROSHOT_TASKS)}")
        bad = [k for k, n in v.items() if n is not None and n < 1]
        if bad:
            raise ValueError(f"{bad[0]}: give at least 1 item, or null for the full set")
        return v


class PruneCfg(Strict):
    kind: Literal["prune"]
    method: Literal["magnitude", "wanda", "sparsegpt"]
    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of zeros per row (unstructured)")
    pattern: str = Field("unstructured", description="'unstructured', 'N:M' (e.g. '2:4'), or 'structured' (whole FFN "
                         "channels / KV head groups removed: a smaller dense model)")
    # sparsegpt (Frantar & Alistarh 2023): the reference code's defaults
    blocksize: int = Field(128, ge=1, description="sparsegpt: columns pruned together before the lazy OBS update")
    damp: float = Field(0.01, gt=0, lt=1, description="sparsegpt: dampening added to the Hessian diagonal, as a fraction "
                        "of its mean (percdamp)")
    # structured: the same count removed in every decoder layer, so the result is a standard smaller config
    ffn_sparsity: float = Field(0.0, ge=0, lt=1, description="structured: fraction of FFN channels (intermediate_size) "
                                "removed per layer, rounded so the kept count is a multiple of channel_multiple")
    head_groups: int = Field(0, ge=0, description="structured: KV head groups removed per layer (a KV head with its "
                             "query heads)")
    channel_multiple: int = Field(128, ge=1, description="structured: the kept intermediate_size is a multiple of this "
                                  "(128 keeps GPTQ groups of 64 and 128 dividing it)")

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, v) -> str:
        if not isinstance(v, str):
            raise ValueError("use 'unstructured', 'structured' or 'N:M' in quotes, e.g. pattern: \"2:4\"")
        if v not in ("unstructured", "structured"):
            m = re.fullmatch(r"(\d+):(\d+)", v)
            if not m or not 0 < int(m[1]) < int(m[2]):
                raise ValueError("use 'unstructured', 'structured' or 'N:M' with 0 < N < M, e.g. '2:4'")
        return v

    @model_validator(mode="after")
    def _one_target(self) -> "PruneCfg":
        given = self.model_fields_set
        if self.pattern == "structured":
            if self.method == "sparsegpt":
                raise ValueError("method sparsegpt prunes unstructured or N:M; for pattern structured use method wanda "
                                 "(activation scores) or magnitude")
            if "sparsity" in given:
                raise ValueError("pattern structured takes ffn_sparsity and head_groups, not sparsity; rename it ffn_sparsity")
            if not self.ffn_sparsity and not self.head_groups:
                raise ValueError("pattern structured removes nothing; set ffn_sparsity (e.g. 0.25) and/or head_groups (e.g. 1)")
        else:
            extra = sorted(given & {"ffn_sparsity", "head_groups", "channel_multiple"})
            if extra:
                raise ValueError(f"{', '.join(extra)} apply to pattern: structured only; drop them or set pattern: structured")
            if self.nm and "sparsity" in given:
                raise ValueError(f"an N:M pattern fixes the sparsity ({self.pattern}); drop sparsity, or use pattern: unstructured")
        if self.method != "sparsegpt" and given & {"blocksize", "damp"}:
            raise ValueError("blocksize and damp apply to method sparsegpt only; drop them or set method: sparsegpt")
        if self.method == "sparsegpt" and self.nm and self.blocksize % self.nm[1]:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of M={self.nm[1]} of pattern {self.pattern} "
                             f"(an N:M group may not straddle two blocks); use e.g. blocksize: 128")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of an N:M pattern, None when unstructured or structured."""
        return None if self.pattern in ("unstructured", "structured") else tuple(map(int, self.pattern.split(":")))  # type: ignore[return-value]

    @property
    def structured(self) -> bool:
        return self.pattern == "structured"


GPTQ_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # GPTQModel 7.6's QuantizeConfig accepts these
# fields that only some methods read: setting one for another method is a mistake worth a one-line error
METHOD_FIELDS = {"bits": ("gptq", "rtn"), "group_size": ("gptq", "rtn"), "sym": ("gptq", "rtn"),
                 "desc_act": ("gptq",), "damp_percent": ("gptq",), "calibration": ("gptq",), "true_sequential": ("gptq",), "double_quant": ("nf4",)}


class QuantMethodCfg(Strict):
    method: Literal["nf4", "gptq", "rtn", "int8"] = Field(
        description="nf4 (bitsandbytes 4-bit NormalFloat), gptq (calibrated; see `calibration`), rtn (round-to-nearest, "
        "no calibration, same GPTQ checkpoint format), int8 (bitsandbytes LLM.int8)")
    bits: Literal[2, 3, 4, 8] = Field(4, description="gptq / rtn: bits per weight")
    group_size: int = Field(64, description="gptq / rtn: weights sharing one scale + zero along in_features; -1 = one "
                            "per output channel. Must divide every in_features (SmolLM2: 64, not 128)")
    sym: bool = Field(True, description="gptq / rtn: symmetric grid (zero point fixed at the middle); false = asymmetric")
    desc_act: bool = Field(False, description="gptq: quantize columns in order of decreasing activation (act-order); "
                           "false: group-aware reordering (GPTQModel's act_group_aware default; our pass does the same)")
    damp_percent: float = Field(0.05, gt=0, lt=1, description="gptq: Hessian dampening as a fraction of its mean "
                                "diagonal; GPTQModel's default 0.05, the GPTQ paper / llm-compressor 0.01")
    calibration: Literal["base", "peft"] = Field(
        "peft", description="gptq on a source with PEFT parts (LoRA, adapters, prompt, prefix, unmerged): peft = "
        "the Hessians from the inputs the layers see with those parts active; base = from the base weights alone "
        "(what GPTQModel's own pass can do: it cannot run them). Measured on the H200 at "
        "real budgets ([hybrid, gptq4], 128 x 2048 calibration): peft 29.09 vs base 30.51 domain ppl, better on 67 of "
        "70 held-out windows; WikiText-2 equal (bench/results/README.md)")
    true_sequential: bool = Field(True, description="gptq: calibrate o_proj on the outputs of the already-quantized "
                                  "q/k/v, down_proj on those of gate/up (GPTQModel's default); false = one pass per "
                                  "layer: ~35% faster, equal within noise on SmolLM2-135M (bench gptq_own)")
    double_quant: bool = Field(True, description="NF4: quantize the quantization constants too")
    embeddings: Literal["keep", "int8"] = Field(
        "keep", description="int8 = also round the input embedding (and a tied lm_head: the same tensor) to int8, one "
        "scale per row, stored apart from the checkpoint (embed_int8.safetensors): SmolLM2-135M's embedding is 40% of "
        "its weights, so a 4-bit node shrinks by a further ~27 MB. No client loads an int8 embedding with NF4 / GPTQ "
        "weights (GPTQModel refuses tied embeddings; bitsandbytes converts linears only; torchao's int8 embedding does "
        "not survive transformers' safetensors save): the export's hybrid_loader.py puts it in. Measured cost "
        "(bench/embed8.py): none beyond noise on 4 nodes")

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v not in GPTQ_GROUP_SIZES:
            raise ValueError(f"use one of {list(GPTQ_GROUP_SIZES)} (-1 = per output channel)")
        return v

    @model_validator(mode="after")
    def _fields_of_method(self) -> "QuantMethodCfg":
        for name, methods in METHOD_FIELDS.items():
            if name in self.model_fields_set and self.method not in methods:
                raise ValueError(f"{name} applies to method {' / '.join(methods)} only, not {self.method}; drop it")
        return self

class QuantizeCfg(QuantMethodCfg):
    kind: Literal["quantize"]


class PtqCfg(QuantMethodCfg):
    kind: Literal["ptq"]


PeftMethod = Literal["lora", "adapter", "prompt", "prefix"]


class PruneDuringCfg(Strict):
    """Gradual pruning of the base while the PEFT parts train: cubic schedule (Zhu & Gupta 2017) from 0 at `start` to
    `sparsity` at `end` (fractions of the training steps), a pruning step every `every` steps in between; unstructured
    per-row masks that only grow, scored on the effective weight W + BA (LoRA delta where LoRA targets the layer)."""
    method: Literal["magnitude", "wanda"] = Field("wanda", description="wanda: |W + BA| x input norms of the training "
                                                  "batches since the last pruning step; magnitude: |W + BA|")
    sparsity: float = Field(0.5, gt=0, lt=1, description="final fraction of zeros per row of each decoder linear")
    start: float = Field(0.1, ge=0, lt=1, description="fraction of the steps after which pruning begins")
    end: float = Field(0.7, gt=0, le=1, description="fraction of the steps at which the target sparsity is reached")
    every: int = Field(5, ge=1, description="steps between pruning steps")

    @model_validator(mode="after")
    def _window(self) -> "PruneDuringCfg":
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be after start ({self.start}); e.g. start: 0.1, end: 0.7")
        return self


class PeftCfg(Strict):
    kind: Literal["peft"]
    methods: list[PeftMethod] = Field(min_length=1)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: list[str] = ["q_proj", "v_proj"]
    adapter_dim: int = Field(32, ge=1, description="bottleneck width of the adapter after each MLP")
    adapter_act: Literal["gelu", "linear"] = Field(
        "gelu", description="adapter activation: gelu (kept as a module through merges), or linear (no activation, no "
        "biases: merge folds it exactly into each MLP's down_proj, so a merged node needs no adapter code to deploy)")
    prompt_tokens: int = Field(8, ge=1, description="soft prompt length (virtual tokens)")
    prefix_tokens: int = Field(8, ge=1, description="prefix tuning: key/value vectors per attention layer")
    prefix_mlp: bool = Field(False, description="prefix tuning: train the prefix through an MLP (Li & Liang's "
                             "reparametrization), folded into plain key/value vectors when saved")
    prefix_mlp_dim: int = Field(512, ge=1, description="hidden width of that MLP")
    prune_during: PruneDuringCfg | None = Field(None, description="raise the base's sparsity while the PEFT parts "
                                                "train, e.g. {method: wanda, sparsity: 0.5, start: 0.1, end: 0.7, every: 5}")
    steps: int = Field(30, ge=1)
    batch_size: int = Field(2, ge=1)
    seq_len: int = Field(128, ge=8)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int | None = Field(None, ge=0, description="linear warm-up steps; default: warmup_fraction of steps")
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="warm-up as a fraction of steps (when warmup_steps is unset)")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after warm-up: cosine decay to 0, or constant lr")
    grad_accum: int = Field(1, ge=1, description="micro-batches of batch_size per optimizer step (steps counts optimizer "
                            "steps; the loss is averaged over every target token of the accumulated batch)")
    eval_every: int | None = Field(None, ge=0, description="held-out loss every N optimizer steps for the curve "
                                   "(train.curve); default: steps // 5 (6 points with step 0); 0 = off")
    eval_sequences: int = Field(4, ge=1, description="held-out sequences (of seq_len) in the fixed sample of the curve "
                                "(CPU-sized: 6 points x 4 x 128 tokens add ~15 s per PEFT node on 2 cores)")
    early_stop_patience: int = Field(0, ge=0, description="stop after this many curve points without a held-out loss "
                                     "improvement of early_stop_min_delta; 0 = off (equal-step runs)")
    early_stop_min_delta: float = Field(1e-3, ge=0)
    fused_loss: Literal["auto", "off"] = Field(
        "auto", description="auto = linear + cross-entropy fused so the [tokens x vocab] logits are never materialized "
        "(liger-kernel on CUDA where installed: pip install '.[gpu]'; a chunked pure-torch loss otherwise); off = the "
        "HF model's own loss")
    compile: bool = Field(False, description="torch.compile each decoder layer for training (CUDA only; ignored on CPU). "
                          "Measured on the Llama-3.2-1B shape, 8 x 1024, LoRA q/v, bf16, H200: 1.49x plain peft's "
                          "tokens/s at 0.48x its peak memory with the fused loss (1.05x / 0.64x without compile), "
                          "after a one-off compile of tens of seconds per process: pays on long runs and big models")
    cuda_graph: bool = Field(False, description="record one whole training step (forward, backward, clipping, AdamW) "
                             "as a CUDA graph and replay it (CUDA only; ignored on CPU). A small model's step is "
                             "thousands of short kernels, bound by their launches in eager mode. Needs fixed shapes "
                             "(a token-stream domain, grad_accum 1, no prune_during): otherwise it trains eagerly and "
                             "the node's train.cuda_graph says why. Uses the HF loss (the fused loss syncs the host)")
    seeds: list[int] | None = Field(None, min_length=1, description="train once per seed (default: the global seed); "
                                    "the first seed's parts feed the children, the report gives mean and spread")

    @model_validator(mode="after")
    def _act_needs_adapter(self) -> "PeftCfg":
        if "adapter_act" in self.model_fields_set and "adapter" not in self.methods:
            raise ValueError("adapter_act applies to the adapter method; add adapter to methods or drop adapter_act")
        return self

    @field_validator("methods")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("list each method once")
        return v

    @model_validator(mode="after")
    def _prune_one_seed(self) -> "PeftCfg":
        if self.prune_during and self.seeds and len(self.seeds) > 1:
            raise ValueError("prune_during makes the base weights depend on the training seed, and a node has one base; "
                             "give one seed, or drop prune_during")
        return self

    @model_validator(mode="after")
    def _graph_or_compile(self) -> "PeftCfg":
        if self.cuda_graph and self.compile:  # measured: recording the compiled layers fails and poisons the process
            raise ValueError("cuda_graph and compile do not combine (recording the compiled layers fails on the GPU); "
                             "keep one: cuda_graph for small models, compile for big ones")
        return self

    @model_validator(mode="after")
    def _warmup_fits(self) -> "PeftCfg":
        if self.warmup_steps is not None and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps}); lower it")
        if self.early_stop_patience and self.eval_every == 0:
            raise ValueError("early_stop_patience needs the held-out curve; set eval_every > 0 (or drop early stopping)")
        return self

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(self.steps * self.warmup_fraction)

    @property
    def curve_every(self) -> int:
        """Optimizer steps between held-out evaluations (0 = no curve)."""
        return max(1, self.steps // 5) if self.eval_every is None else self.eval_every


class MergeCfg(Strict):
    kind: Literal["merge"]
    keep_mask: bool = Field(True, description="sparse base: re-apply its zeros after folding LoRA")


StageCfg = Annotated[Union[PruneCfg, QuantizeCfg, PeftCfg, MergeCfg, PtqCfg], Field(discriminator="kind")]


class Params(Strict):
    seed: int = 0
    model: ModelCfg = ModelCfg()
    data: DataCfg
    evaluate: EvaluateCfg = EvaluateCfg()
    stages: dict[str, StageCfg]
    orderings: dict[str, list[str]] = Field(min_length=1)

    @model_validator(mode="after")
    def _names(self) -> "Params":
        for where, names in (("stages", self.stages), ("orderings", self.orderings)):
            for name in names:
                if not NAME_RE.fullmatch(name) or name == "base":
                    raise ValueError(f"{where}.{name.encode('unicode_escape').decode()}: rename it to letters, digits and '_' only (not 'base')")
        for name in self.data.eval:
            if name in RESERVED_CORPORA:
                raise ValueError(f"data.eval.{name}: the name is reserved (the pipeline adds the domain's held-out split "
                                 f"under it); rename the corpus")
        for oname, chain in self.orderings.items():
            if not chain:
                raise ValueError(f"orderings.{oname}: list at least one stage config")
            for i, s in enumerate(chain):
                if s not in self.stages:
                    raise ValueError(f"orderings.{oname}[{i}]: unknown stage config '{s}'; define it under stages: or fix the name")
        return self


def _format(err: ValidationError, path: Path) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in ("prune", "quantize", "peft", "merge", "ptq")))
    msg = e["msg"].removeprefix("Value error, ")
    got = f" (got {e['input']!r})" if e["type"] not in ("missing", "value_error") and not isinstance(e.get("input"), dict) else ""
    where = f"{loc}: " if loc else ""
    return f"{path}: {where}{msg}{got}; fix it in {path.name}"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter: duplicate keys are refused, `2:4` stays the string "2:4" and `off` the string
    "off".

    YAML 1.1 (PyYAML) reads an unquoted 2:4 as the base-60 integer 124; DVC reads params.yaml as YAML 1.2, where it is
    the string "2:4". Reading it as DVC does keeps one meaning for one file."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1}); keep one", mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _int_or_sexagesimal_str(loader: yaml.SafeLoader, node):
    value = loader.construct_scalar(node)
    return value if ":" in value else yaml.SafeLoader.construct_yaml_int(loader, node)


def _bool_or_str(loader: yaml.SafeLoader, node):
    """YAML 1.2 (DVC's reading) has only true / false as booleans: `fused_loss: off` is the string "off", not False."""
    value = loader.construct_scalar(node)
    return value if value.lower() not in ("true", "false") else value.lower() == "true"


_Loader.add_constructor("tag:yaml.org,2002:int", _int_or_sexagesimal_str)
_Loader.add_constructor("tag:yaml.org,2002:bool", _bool_or_str)
_Loader.add_constructor("tag:yaml.org,2002:map", _Loader.construct_mapping)


def read_yaml(path: Path) -> dict:
    """A YAML mapping from `path`; errors are one line with the line and column."""
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: {exc.problem or exc.context}; fix the YAML there") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (seed:, model:, data:, stages:, orderings:); "
                          f"got a {type(raw).__name__}")
    return raw


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate a params file. Relative paths in it (data files, model.source) are relative to its directory:
    the CLI changes into that directory before any work."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found; run from the project root or pass --params PATH")
    return parse_params(read_yaml(path), path)


def parse_params(raw: dict, path: Path = Path("params.yaml")) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, path)) from None


def uses_calibration(cfg: StageCfg) -> bool:
    """Stages that read the calibration corpus (Wanda scores, SparseGPT and GPTQ Hessians)."""
    return (cfg.kind == "prune" and cfg.method in ("wanda", "sparsegpt")) or (cfg.kind in ("quantize", "ptq") and cfg.method == "gptq")


def storage_format(cfg: "QuantMethodCfg") -> str:
    """How a quantize method stores its weights (the artifact's `format`): RTN writes the GPTQ checkpoint format."""
    return "gptq" if cfg.method == "rtn" else cfg.method
