"""params.yaml -> dvc.yaml: one DVC stage per node, plus the report.

A node's stage depends on its parent's artifact, the code of its stage kind, the data it reads and the params it
uses, so `dvc repro` reruns exactly the subtree under a changed stage config.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import yaml

from .config import Params, uses_calibration
from .models import DEFAULT_MODEL
from .plan import build_plan
from .runner import ARTIFACTS, METRICS

PKG = Path(__file__).resolve().parent
# Every node runs these (the runner, the plan state, the evaluation) besides its kind's stage module; the modules
# they import inside the package are found by `_imports`, so a new helper module can never be missed.
COMMON_CODE = ["runner.py", "plan.py", "stages/evaluate.py"]
ZEROSHOT_CODE = ["zeroshot.py", "zeroshot_tasks"]
# the data dir each zero-shot task reads (pipeline/zeroshot_tasks/local.py)
ZEROSHOT_DATA = {"hellaswag": "hellaswag-val", "arc_easy": "ai2-arc-test", "arc_challenge": "ai2-arc-test",
                 "piqa": "piqa-val", "winogrande": "winogrande-dev", "boolq": "boolq-superglue-val",
                 "lambada_openai": "lambada-openai-test", "openbookqa": "openbookqa-main-test", "sst2": "sst2-glue-dev"}
HEADER = "# Generated from params.yaml by `python -m pipeline dvc-yaml`: do not edit; edit params.yaml and regenerate.\n"


@lru_cache(maxsize=None)
def _imports(start: str) -> frozenset[str]:
    """`start` (a file under pipeline/) and every module of the package it imports, transitively, lazy imports
    inside functions included (an over-approximation is safe: it can only rerun a node, never skip one)."""
    seen, todo = set(), [PKG / start]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        pkg = list(f.parent.relative_to(PKG).parts)
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue  # the package imports itself relatively only
            mod = pkg[: len(pkg) - node.level + 1] + (node.module.split(".") if node.module else [])
            for name in [mod] + [mod + [a.name] for a in node.names]:
                path = PKG.joinpath(*name)
                for candidate in (path.with_suffix(".py"), path / "__init__.py"):
                    if candidate.is_file() and candidate != PKG / "stages" / "__init__.py":  # that one imports every stage
                        todo.append(candidate)
                        break
    return frozenset(str(p.relative_to(PKG)) for p in seen)


def code_of(kind: str) -> list[str]:
    """The package files a node of `kind` depends on (`base` runs only the common code)."""
    files = set().union(*(_imports(f) for f in COMMON_CODE + ([f"stages/{kind}.py"] if kind != "base" else [])))
    return sorted(f for f in files if not f.startswith("zeroshot"))  # added with the task data when zero-shot is on


def _code(files: list[str], root: Path) -> list[str]:
    """Code deps, relative to the repo root; none when the package is installed outside the repo (tests)."""
    try:
        rel = PKG.relative_to(root.resolve())
    except ValueError:
        return []
    return [str(rel / f) for f in files]


def _data_files(params: Params, *, calibration: bool) -> list[str]:
    """Every data file the node reads; files outside the repo are DVC external deps (absolute paths)."""
    corpora = list(params.data.eval.values()) + [params.data.domain]  # domain held-out is always evaluated
    if calibration:
        corpora.append(params.data.calibration)
    return sorted({f.strip() for c in corpora for f in c.files.split(",") if f.strip()})


def _model_dep(params: Params) -> list[str]:
    """The base model's dir, when it is a local dir (the default is a pinned PyPI package: models.py says which)."""
    return [] if params.model.source == DEFAULT_MODEL else [params.model.source.rstrip("/")]


def generate(params: Params, root: Path = Path(".")) -> dict:
    plan = build_plan(params)
    stages: dict[str, dict] = {}
    for node in plan.nodes.values():
        cfg = params.stages[node.config] if node.config else None
        kind = cfg.kind if cfg else "base"
        calib = cfg is not None and uses_calibration(cfg)
        deps = ([str(ARTIFACTS / node.parent)] if node.parent else []) + _code(code_of(kind), root)
        deps += _data_files(params, calibration=calib) + (_model_dep(params) if node.parent is None else [])
        if params.evaluate.zeroshot:
            deps += _code(ZEROSHOT_CODE, root) + sorted({f"data/{ZEROSHOT_DATA[t]}" for t in params.evaluate.zeroshot})
        keys = ["seed", "model", "evaluate", "data.eval", "data.domain"] + (["data.calibration"] if calib else [])
        keys += [f"stages.{node.config}"] if node.config else []
        stages[node.name] = {
            "cmd": f"python -m pipeline run {node.name}",
            "deps": deps,
            "params": keys,
            "outs": [str(ARTIFACTS / node.name)],
            "metrics": [{str(METRICS / f"{node.name}.json"): {"cache": False}}],
        }
    curves = any(c.kind == "peft" and c.curve_every for c in params.stages.values())  # report.plot_curves draws them
    stages["report"] = {
        "cmd": "python -m pipeline report",
        "deps": [str(METRICS / f"{n}.json") for n in plan.nodes] + _code(["report.py"], root),
        "params": ["orderings"],
        "outs": [{"reports/compare.md": {"cache": False}}, {"reports/pareto.png": {"cache": False}},
                 {"reports/nodes.csv": {"cache": False}}] + ([{"reports/train_curves.png": {"cache": False}}] if curves else []),
        "metrics": [{"reports/compare.json": {"cache": False}}],
    }
    # `dvc plots show` / `dvc plots diff`: the Pareto image and one point per node (compare.json nests too deep)
    plots = [{"reports/pareto.png": None}] + ([{"reports/train_curves.png": None}] if curves else []) + [
        {"reports/nodes.csv": {"template": "scatter", "x": "mb", "y": "ppl_domain_heldout",
                               "title": "Per node: domain perplexity vs MB to deploy"}}]
    return {"stages": stages, "plots": plots}


def render(params: Params, root: Path = Path(".")) -> str:
    return HEADER + yaml.safe_dump(generate(params, root), sort_keys=False, width=120)
