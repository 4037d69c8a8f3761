"""The comparison as a Prefect flow: one task per node of the trie (each its DVC stage), then the report,
published as Prefect artifacts (markdown report + table).

    python -m flows.compare [--repo .] [--orderings a,b] [--engine local|dask|ray] [--address ADDR] [--workers N]

engine=local runs the stages in the project directory. engine=dask|ray runs them on cluster workers, each in its own
checkout of the project's commit, exchanging artifacts through the project's DVC remote (flows/distributed.py).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.settings import get_current_settings

from flows.distributed import current_results, merge_result, source, stale_nodes, worker_inputs
from flows.engines import Engine, claim, task_runner
from flows.scheduler import Outcome, run_trie
from pipeline.config import load_params
from pipeline.dvcgen import render
from pipeline.plan import Plan, build_plan
from tasks.dvc_stage import run_dvc_stage
from tasks.remote_stage import run_remote_stage


class NodesFailed(RuntimeError):
    """Some nodes failed; the others' results are kept (DVC), so a rerun resumes where this one stopped."""


def select(plan: Plan, orderings: list[str] | None) -> list[str]:
    """The nodes of the given orderings (all of them when None), in topological order."""
    if not orderings:
        return list(plan.nodes)
    unknown = [o for o in orderings if o not in plan.leaves]
    if unknown:
        raise ValueError(f"orderings: no {', '.join(unknown)} in params.yaml; there are {', '.join(plan.leaves)}")
    keep: set[str] = set()
    for o in orderings:
        node = plan.leaves[o]
        while node is not None:
            keep.add(node)
            node = plan.nodes[node].parent
    return [n for n in plan.nodes if n in keep]


def publish(repo: Path, results: dict[str, dict], full: bool) -> None:
    """The report (after a run of every ordering), else the table of the nodes that ran, as Prefect artifacts."""
    if full:
        md = (repo / "reports" / "compare.md").read_text()
        rows = [{"node": n, **v} for n, v in json.loads((repo / "reports" / "compare.json").read_text()).items()]
    else:
        rows = [{"node": n, "ppl": r["metrics"]["ppl"], "MB": round(r["metrics"]["size"]["bytes"] / 2**20, 2)}
                for n, r in results.items() if r.get("metrics")]
        md = "# Orderings subset\n\n" + "\n".join(f"- `{r['node']}`: ppl {r['ppl']}, {r['MB']} MB" for r in rows)
    create_markdown_artifact(key="compare-orderings", markdown=md, description="Orderings compared (reports/compare.md)")
    create_table_artifact(key="compare-table", table=rows,
                          description="One row per node: perplexities, MB to deploy, bits/weight, sparsity, decode tok/s")


def _run_local(root: Path, plan: Plan, nodes: list[str], workers: int) -> Outcome:
    with task_runner("local", workers=workers) as runner:
        return run_trie(plan, nodes, lambda n, _: runner.submit(run_dvc_stage, {"stage": n, "repo": str(root)}))


def _run_remote(root: Path, plan: Plan, nodes: list[str], engine: Engine, address: str | None, workers: int,
                gpus_per_node: float, git_url: str | None, remote: str | None) -> Outcome:
    if not get_current_settings().api.url:  # else every worker process would start its own temporary server
        raise ValueError(f"engine {engine} needs a Prefect server that the workers reach too: "
                         "prefect server start, then set PREFECT_API_URL (here and on the workers)")
    src = source(root, git_url)
    stale = stale_nodes(root, plan, nodes)
    done = current_results(root, [n for n in nodes if n not in stale])
    get_run_logger().info("%d of %d nodes to run on %s workers (commit %s from %s); %d current on the DVC remote",
                          len(stale), len(nodes), engine, src.rev[:10], src.git_url, len(done))
    if not stale:
        return Outcome(results=done)

    def submit(node: str, results: dict[str, dict]):
        params = {**worker_inputs(plan, node, results), "git_url": src.git_url, "rev": src.rev, "remote": remote}
        with claim(engine, gpus_per_node):
            return runner.submit(run_remote_stage, params)

    gpus = int(workers * gpus_per_node)  # a temporary local cluster offers one GPU slot per claim
    with task_runner(engine, address=address, workers=workers, gpus=gpus) as runner:
        return run_trie(plan, nodes, submit, done=done, on_result=lambda n, r: merge_result(root, n, r))


@flow(name="compare-orderings", log_prints=True)
def compare(repo: str = ".", orderings: list[str] | None = None, engine: Engine = "local", address: str | None = None,
            workers: int = 2, gpus_per_node: float = 0, git_url: str | None = None, remote: str | None = None) -> dict:
    """Run the nodes of the orderings (all when `orderings` is empty) in <repo>/params.yaml through DVC, then build
    and publish the report.

    engine: local (threads in `repo`), dask or ray (workers with their own checkouts; artifacts via the DVC remote).
    address: an existing Dask scheduler (tcp://host:8786) or Ray cluster (ray://host:10001, auto); none starts a
    local cluster of `workers` processes. gpus_per_node: GPUs each node claims on the cluster. git_url: where workers
    clone the project (default: its origin, else its directory). remote: the DVC remote (default: the repo's)."""
    root = Path(repo).resolve()
    params = load_params(root / "params.yaml")
    plan = build_plan(params)
    if (root / "dvc.yaml").read_text() != render(params, root):
        raise ValueError(f"{root / 'dvc.yaml'} is stale for params.yaml; run: python -m pipeline dvc-yaml")
    nodes = select(plan, orderings)
    if engine == "local":
        out = _run_local(root, plan, nodes, workers)
    else:
        out = _run_remote(root, plan, nodes, engine, address, workers, gpus_per_node, git_url, remote)
    log = get_run_logger()
    ran = [n for n in nodes if out.results.get(n, {}).get("ran")]
    if out.failed:
        lines = [f"{n}: {err}" for n, err in out.failed.items()]
        if out.skipped:
            lines.append(f"not run (below a failed node): {', '.join(out.skipped)}")
        lines.append(f"kept: {len(out.results)} finished nodes (a rerun resumes from them)")
        raise NodesFailed(f"{len(out.failed)} of {len(nodes)} nodes failed\n" + "\n".join(lines))
    full = len(nodes) == len(plan.nodes)
    if full:  # the report reads only metrics, which the driver holds: it runs here whatever the engine
        run_dvc_stage("report", str(root))
    publish(root, out.results, full)
    log.info("%d nodes, %d ran, %d from the DVC cache", len(nodes), len(ran), len(nodes) - len(ran))
    ran_here = {n: r for n, r in out.results.items() if r.get("ran")}
    return {"ran": ran, "nodes": nodes, "workers": {n: r.get("worker") for n, r in ran_here.items()},
            "gpus": {n: r.get("gpus") for n, r in ran_here.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description="Run the comparison of orderings as a Prefect flow (one task per node).")
    ap.add_argument("--repo", default=".", help="project root holding params.yaml and dvc.yaml (default: .)")
    ap.add_argument("--orderings", default="", help="comma-separated subset of the orderings (default: all)")
    ap.add_argument("--engine", default="local", choices=["local", "dask", "ray"],
                    help="local threads (default), or Dask / Ray workers with their own checkouts + the DVC remote")
    ap.add_argument("--address", default=None, help="an existing Dask scheduler or Ray cluster (default: start one)")
    ap.add_argument("--workers", type=int, default=2, help="concurrent nodes / local cluster workers (default: 2)")
    ap.add_argument("--gpus-per-node", type=float, default=0, help="GPUs each node claims on the cluster (default: 0)")
    ap.add_argument("--git-url", default=None, help="where workers clone the project (default: origin, else --repo)")
    ap.add_argument("--remote", default=None, help="the DVC remote workers pull and push (default: the repo's)")
    a = ap.parse_args()
    compare(repo=a.repo, orderings=[o for o in a.orderings.split(",") if o] or None, engine=a.engine,
            address=a.address, workers=a.workers, gpus_per_node=a.gpus_per_node, git_url=a.git_url, remote=a.remote)


if __name__ == "__main__":
    main()
