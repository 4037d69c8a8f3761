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


class CalibrationCfg(CorpusCfg):
    samples: int = Field(16, ge=1)
    seq_len: int = Field(256, ge=8)


class DomainCfg(CorpusCfg):
    heldout_fraction: float = Field(0.1, gt=0, lt=1)


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


class QuantMethodCfg(Strict):
    method: Literal["nf4", "gptq"]
    bits: Literal[4] = 4
    group_size: int = Field(64, description="GPTQ group size; must divide every in_features (SmolLM2: 64, not 128)")
    double_quant: bool = Field(True, description="NF4: quantize the quantization constants too")


class QuantizeCfg(QuantMethodCfg):
    kind: Literal["quantize"]


class PtqCfg(QuantMethodCfg):
    kind: Literal["ptq"]


PeftMethod = Literal["lora", "adapter", "prompt"]


class PeftCfg(Strict):
    kind: Literal["peft"]
    methods: list[PeftMethod] = Field(min_length=1)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: list[str] = ["q_proj", "v_proj"]
    adapter_dim: int = Field(32, ge=1, description="bottleneck width of the adapter after each MLP")
    prompt_tokens: int = Field(8, ge=1, description="soft prompt length (virtual tokens)")
    steps: int = Field(30, ge=1)
    batch_size: int = Field(2, ge=1)
    seq_len: int = Field(128, ge=8)
    lr: float = Field(1e-3, gt=0)
    seeds: list[int] | None = Field(None, min_length=1, description="train once per seed (default: the global seed); "
                                    "the first seed's parts feed the children, the report gives mean and spread")

    @field_validator("methods")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("list each method once")
        return v


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
    """PyYAML's safe loader, stricter: duplicate keys are refused, and `2:4` stays the string "2:4".

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


_Loader.add_constructor("tag:yaml.org,2002:int", _int_or_sexagesimal_str)
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
