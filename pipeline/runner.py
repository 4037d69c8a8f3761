"""Run one node: build its artifact from its parent's (atomically), evaluate it, write metrics/<node>.json."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from . import artifact
from .config import Params, uses_calibration
from .models import device_of, load_source, save_weights
from .plan import Node, Plan, build_plan
from .stages import STAGES, evaluate

ARTIFACTS = Path("artifacts")
METRICS = Path("metrics")


def artifact_path(node: str, root: Path = Path(".")) -> Path:
    return root / ARTIFACTS / node


def metrics_path(node: str, root: Path = Path(".")) -> Path:
    return root / METRICS / f"{node}.json"


def node_fingerprint(params: Params, node: Node) -> str:
    """What the artifact depends on: the base model, the seed, the data, and every stage config on its chain."""
    d = params.data
    chain = [(c, params.stages[c].model_dump(), d.calibration.model_dump() if uses_calibration(params.stages[c]) else None)
             for c in node.chain]
    return artifact.fingerprint({"model": params.model.model_dump(), "seed": params.seed, "eval":
                                 {k: v.model_dump() for k, v in d.eval.items()}, "domain": d.domain.model_dump(), "chain": chain})


def metrics_fingerprint(params: Params, node: Node) -> str:
    """Metrics depend on the artifact and on the evaluation settings."""
    return artifact.fingerprint([node_fingerprint(params, node), params.evaluate.model_dump()])


def node_status(params: Params, plan: Plan, root: Path = Path(".")) -> dict[str, str]:
    """cached (artifact + metrics match the params) | stale (params changed) | missing, per node."""
    out = {}
    for name, node in plan.nodes.items():
        try:
            fp = artifact.read_manifest(artifact_path(name, root))["fingerprint"]
        except (FileNotFoundError, KeyError, ValueError):
            out[name] = "missing"
            continue
        metrics = metrics_path(name, root)
        fresh = (fp == node_fingerprint(params, node) and metrics.is_file()
                 and json.loads(metrics.read_text()).get("fingerprint") == metrics_fingerprint(params, node))
        out[name] = "cached" if fresh else "stale"
    return out


def build_base(params: Params, out: Path) -> dict:
    model, tok = load_source(params.model, device_of(params.model))
    save_weights(model, tok, out)
    return {"format": "hf", "weights": ".", "source": params.model.source}


def run_node(name: str, params: Params, root: Path = Path(".")) -> dict:
    plan = build_plan(params)
    if name not in plan.nodes:
        raise KeyError(f"no node '{name}' in the plan; `python -m pipeline plan` lists them")
    node = plan.nodes[name]
    src = artifact_path(node.parent, root) if node.parent else None
    if src is not None:
        artifact.read_manifest(src)  # a clear error if the parent has not run
    out = artifact_path(name, root)
    cfg = params.stages[node.config] if node.config else None
    evaluate.reset_peak_memory(device_of(params.model))
    t0 = time.perf_counter()
    with artifact.atomic_dir(out) as tmp:
        info = build_base(params, tmp) if cfg is None else STAGES[cfg.kind].run(src, cfg, tmp, params)
        stage_s = time.perf_counter() - t0
        stage_peak = evaluate.peak_memory_mb(device_of(params.model))
        fmt, weights = info.pop("format"), info.pop("weights")
        man = artifact.manifest(
            node=name, chain=list(node.chain), kind=cfg.kind if cfg else "base",
            config=cfg.model_dump() if cfg else params.model.model_dump(), parent=src,
            state={**dataclasses.asdict(node.state), "format": fmt}, weights=weights,
            fingerprint_=node_fingerprint(params, node), stats={},
            timings={"stage_s": round(stage_s, 2)}, extra={"format": fmt, "peak_memory_mb": {"stage": stage_peak}, **info})
        artifact.write_json(tmp / artifact.MANIFEST, man)
    metrics = evaluate.run(out, params)
    metrics["peak_memory_mb"] = {"stage": stage_peak, "stage+eval": evaluate.peak_memory_mb(device_of(params.model))}
    man["stats"] = {**metrics["params"], **metrics["size"]}
    man["timings"]["eval_s"] = metrics["eval_seconds"]
    artifact.write_json(out / artifact.MANIFEST, man)
    result = {"node": name, "fingerprint": metrics_fingerprint(params, node), "chain": list(node.chain),
              "kind": man["kind"], "state": node.state.describe(), "orderings": node.orderings, "flags": node.flags, "stage_seconds": round(stage_s, 2), **metrics,
              **{k: info[k] for k in ("train", "merge_error", "prune") if k in info}}
    artifact.write_json(metrics_path(name, root), result)
    return result
