"""Run one node: build its artifact from its parent's (atomically), evaluate it, write metrics/<node>.json.

A node is built only on a parent that is current (its fingerprint matches the params) and intact (its files match
its manifest); a node whose artifact is complete but whose metrics are missing or stale is only evaluated.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from . import artifact
from .config import CorpusCfg, Params, uses_calibration
from .data import _files
from .models import device_of, load_source, save_weights, source_fingerprint
from .plan import Node, Plan, build_plan
from .stages import STAGES, evaluate

ARTIFACTS = Path("artifacts")
METRICS = Path("metrics")
# A node's status: its artifact and metrics match the params / only the metrics are missing or stale / it or an
# ancestor changed / its files differ from its manifest / never built.
CACHED, NOT_EVALUATED, STALE, CORRUPT, MISSING = "cached", "not evaluated", "stale", "corrupt", "missing"


def artifact_path(node: str, root: Path = Path(".")) -> Path:
    return root / ARTIFACTS / node


def metrics_path(node: str, root: Path = Path(".")) -> Path:
    return root / METRICS / f"{node}.json"


def _data_fingerprint(corpus: CorpusCfg) -> dict:
    """A corpus config plus the content of its files: editing a data file in place changes every fingerprint."""
    return {**corpus.model_dump(), "content": artifact.content_fingerprint([Path(f) for f in _files(corpus.files)])}


def node_fingerprint(params: Params, node: Node) -> str:
    """What the artifact depends on: the base model (by content), the seed, the data (by content), and every stage
    config on its chain."""
    d = params.data
    chain = [(c, params.stages[c].model_dump(), _data_fingerprint(d.calibration) if uses_calibration(params.stages[c]) else None)
             for c in node.chain]
    return artifact.fingerprint({"model": params.model.model_dump(), "model_content": source_fingerprint(params.model),
                                 "seed": params.seed, "eval": {k: _data_fingerprint(v) for k, v in d.eval.items()},
                                 "domain": _data_fingerprint(d.domain), "chain": chain})


def metrics_fingerprint(params: Params, node: Node) -> str:
    """Metrics depend on the artifact and on the evaluation settings."""
    return artifact.fingerprint([node_fingerprint(params, node), params.evaluate.model_dump()])


def _metrics_fresh(params: Params, node: Node, root: Path) -> bool:
    path = metrics_path(node.name, root)
    try:
        return json.loads(path.read_text()).get("fingerprint") == metrics_fingerprint(params, node)
    except (OSError, ValueError, AttributeError):
        return False


def artifact_status(params: Params, node: Node, root: Path = Path("."), parent_ok: bool = True) -> str:
    """The status of one node's artifact alone: MISSING | CORRUPT | STALE | NOT_EVALUATED | CACHED."""
    path = artifact_path(node.name, root)
    if not (path / artifact.MANIFEST).is_file():
        return MISSING
    try:
        man = artifact.verify(path)
    except artifact.ArtifactError:
        return CORRUPT
    if not parent_ok or man.get("fingerprint") != node_fingerprint(params, node):
        return STALE
    return CACHED if _metrics_fresh(params, node, root) else NOT_EVALUATED


def node_status(params: Params, plan: Plan, root: Path = Path(".")) -> dict[str, str]:
    """Status per node (see CACHED ...). It depends on the whole chain: a node over a stale, corrupt or missing
    parent is stale whatever its own files say."""
    out: dict[str, str] = {}
    for name, node in plan.nodes.items():  # topological: parents first
        parent_ok = node.parent is None or out[node.parent] in (CACHED, NOT_EVALUATED)
        out[name] = artifact_status(params, node, root, parent_ok)
    return out


def build_base(params: Params, out: Path) -> dict:
    model, tok = load_source(params.model, device_of(params.model))
    save_weights(model, tok, out)
    return {"format": "hf", "weights": ".", "source": params.model.source}


def _check_parent(params: Params, plan: Plan, node: Node, root: Path) -> Path | None:
    """The parent's artifact path, after checking that it is current and intact (or a one-line error)."""
    if node.parent is None:
        return None
    src = artifact_path(node.parent, root)
    hint = f"run it first: dvc repro {node.parent} (or python -m pipeline run {node.parent})"
    if not (src / artifact.MANIFEST).is_file():
        raise artifact.ArtifactError(f"{node.name}: parent artifact {src} does not exist; {hint}")
    man = artifact.verify(src)
    if man["fingerprint"] != node_fingerprint(params, plan.nodes[node.parent]):
        raise artifact.ArtifactError(f"{node.name}: parent {node.parent} was built with other params or inputs "
                                     f"(stale); {hint}")
    return src


def run_node(name: str, params: Params, root: Path = Path("."), *, force: bool = False,
             evaluate: bool = True) -> dict:
    """Build (unless current) and evaluate one node; returns its metrics. Holds the node's lock throughout.
    evaluate=False: build only and return the manifest (a later run_node evaluates it: its status is then
    NOT_EVALUATED), so a scheduler can start the children while the node is being evaluated elsewhere."""
    plan = build_plan(params)
    if name not in plan.nodes:
        raise KeyError(f"no node '{name}' in the plan; `python -m pipeline plan` lists them")
    node = plan.nodes[name]
    out = artifact_path(name, root)
    with artifact.node_lock(out):
        src = _check_parent(params, plan, node, root)
        status = artifact_status(params, node, root)
        if status == CACHED and not force:
            return json.loads(metrics_path(name, root).read_text()) if evaluate else artifact.read_manifest(out)
        if status != NOT_EVALUATED or force:
            man = _build(params, node, src, out, root)
        else:  # a complete artifact whose evaluation was interrupted: evaluate only
            man = artifact.read_manifest(out)
        return _evaluate(params, node, out, man, root) if evaluate else man


def _build(params: Params, node: Node, src: Path | None, out: Path, root: Path) -> dict:
    cfg = params.stages[node.config] if node.config else None
    device = device_of(params.model)
    evaluate.reset_peak_memory(device)
    metrics_path(node.name, root).unlink(missing_ok=True)  # never leave old metrics beside a new artifact
    t0 = time.perf_counter()
    with artifact.atomic_dir(out) as tmp:
        info = build_base(params, tmp) if cfg is None else STAGES[cfg.kind].run(src, cfg, tmp, params)
        stage_s = time.perf_counter() - t0
        fmt, weights = info.pop("format"), info.pop("weights")
        man = artifact.manifest(
            node=node.name, chain=list(node.chain), kind=cfg.kind if cfg else "base",
            config=cfg.model_dump() if cfg else params.model.model_dump(), parent=src,
            state={**dataclasses.asdict(node.state), "format": fmt}, weights=weights,
            fingerprint_=node_fingerprint(params, node), stats={}, timings={"stage_s": round(stage_s, 2)},
            files=artifact.describe_files(tmp),
            extra={"format": fmt, "peak_memory_mb": {"stage": evaluate.peak_memory_mb(device)}, "stage_info": info})
        artifact.write_json(tmp / artifact.MANIFEST, man)
    return man


def _evaluate(params: Params, node: Node, out: Path, man: dict, root: Path) -> dict:
    device = device_of(params.model)
    metrics = evaluate.run(out, params)
    metrics["peak_memory_mb"] = {"stage": man["peak_memory_mb"]["stage"], "stage+eval": evaluate.peak_memory_mb(device)}
    man["stats"] = {**metrics["params"], **metrics["size"]}
    man["timings"]["eval_s"] = metrics["eval_seconds"]
    artifact.write_json(out / artifact.MANIFEST, man)  # the manifest is not among the checksummed files
    info = man.get("stage_info", {})
    result = {"node": node.name, "fingerprint": metrics_fingerprint(params, node), "chain": list(node.chain),
              "kind": man["kind"], "state": node.state.describe(), "orderings": node.orderings, "flags": node.flags,
              "stage_seconds": man["timings"]["stage_s"], **metrics,
              **{k: info[k] for k in ("train", "train_seeds", "merge_error", "prune") if k in info}}
    artifact.write_json(metrics_path(node.name, root), result)
    return result
