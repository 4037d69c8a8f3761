"""The driver's side of a distributed run: which commit the workers check out, which nodes must run (the others are
current on the DVC remote), what each worker is handed, and merging what it hands back into this workspace.

The driver holds no artifacts: only git-tracked files, dvc.lock and the metrics. Workers exchange artifacts
through the DVC remote; the driver's dvc.lock ends up listing every node, as a serial `dvc repro` would have.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.plan import Plan
from tasks.dvc_lock import changed_stages, lockfile_guard, read_entries, write_entries

# What the flow itself writes in the driver's workspace: allowed to differ from the commit the workers check out.
FLOW_OUTPUTS = ("dvc.lock", "metrics/", "reports/")


@dataclass(frozen=True)
class Source:
    git_url: str  # where workers clone from
    rev: str  # the commit they check out


def _git(args: list[str], repo: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ValueError(f"{repo}: git {' '.join(args)} failed: {proc.stderr.strip()}; a distributed run needs a git repo")
    return proc.stdout.strip()


def source(repo: Path, git_url: str | None) -> Source:
    """The driver's HEAD, refusing uncommitted changes the workers would not see (params, dvc.yaml, code)."""
    dirty = [line[3:] for line in _git(["status", "--porcelain", "--untracked-files=no"], repo).splitlines()]
    dirty = [p for p in dirty if not p.startswith(FLOW_OUTPUTS)]
    if dirty:
        raise ValueError(f"uncommitted changes the workers would not see: {', '.join(dirty[:5])}; commit them first "
                         "(workers check out the driver's commit)")
    if not git_url:  # the driver's origin, else the driver's own directory (workers on this host or a shared disk)
        origin = subprocess.run(["git", "config", "--get", "remote.origin.url"], cwd=repo, capture_output=True, text=True)
        git_url = origin.stdout.strip() or str(repo)
    return Source(git_url=git_url, rev=_git(["rev-parse", "HEAD"], repo))


def stale_nodes(repo: Path, plan: Plan, nodes: list[str]) -> set[str]:
    """Nodes to run: changed per DVC (params, code, inputs, or metrics missing here), and everything below them."""
    changed = changed_stages(repo)
    stale: set[str] = set()
    for n in nodes:  # topological: a parent is decided before its children
        if n in changed or plan.nodes[n].parent in stale:
            stale.add(n)
    return stale


def current_results(repo: Path, nodes: list[str]) -> dict[str, dict]:
    """What the driver already has for nodes that need no run: their lock entries and metrics."""
    locks = read_entries(repo)
    out = {}
    for n in nodes:
        metrics = repo / "metrics" / f"{n}.json"
        out[n] = {"stage": n, "ran": False, "lock": locks[n], "worker": None,
                  "metrics": json.loads(metrics.read_text()) if metrics.is_file() else None}
    return out


def ancestors(plan: Plan, node: str) -> list[str]:
    chain, parent = [], plan.nodes[node].parent
    while parent is not None:
        chain.append(parent)
        parent = plan.nodes[parent].parent
    return chain[::-1]


def worker_inputs(plan: Plan, node: str, results: dict[str, dict]) -> dict:
    """The parameters of run_remote_stage besides the source: the ancestors and their lock entries."""
    up = ancestors(plan, node)
    return {"stage": node, "ancestors": up, "locks": {a: results[a]["lock"] for a in up}}


def merge_result(repo: Path, node: str, result: dict) -> None:
    """Write a worker's result into the driver's workspace: its metrics file (byte for byte: dvc.lock holds its
    hash) and its dvc.lock entry. Done as each node finishes, so a later failure keeps what finished."""
    if result.get("metrics_text") is not None:
        path = repo / "metrics" / f"{node}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(result["metrics_text"])
        result["metrics"] = json.loads(result.pop("metrics_text"))
    with lockfile_guard(repo):
        write_entries(repo, {node: result["lock"]})
