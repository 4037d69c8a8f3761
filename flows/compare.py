"""The comparison as a Prefect flow: one task per node of the trie (each its DVC stage), then the report,
published as Prefect artifacts (markdown report + table).

    python -m flows.compare [--repo .]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline.config import load_params
from pipeline.dvcgen import render
from pipeline.plan import build_plan
from tasks.dvc_stage import run_dvc_stage


def publish(repo: Path) -> None:
    md = (repo / "reports" / "compare.md").read_text()
    create_markdown_artifact(key="compare-orderings", markdown=md, description="Orderings compared (reports/compare.md)")
    summary = json.loads((repo / "reports" / "compare.json").read_text())
    create_table_artifact(key="compare-table", table=[{"node": n, **v} for n, v in summary.items()],
                          description="One row per node: perplexities, MB to deploy, bits/weight, sparsity, decode tok/s")


@flow(name="compare-orderings", log_prints=True)
def compare(repo: str = ".") -> dict:
    """Run every node of the orderings in <repo>/params.yaml through DVC, then build and publish the report."""
    root = Path(repo).resolve()
    params = load_params(root / "params.yaml")
    plan = build_plan(params)
    if (root / "dvc.yaml").read_text() != render(params, root):
        raise ValueError(f"{root / 'dvc.yaml'} is stale for params.yaml; run: python -m pipeline dvc-yaml")
    futures = {}
    for node in plan.nodes.values():  # topological order: a node waits for its parent only
        wait = [futures[node.parent]] if node.parent else []
        futures[node.name] = run_dvc_stage.submit(node.name, str(root), wait_for=wait)
    report = run_dvc_stage.submit("report", str(root), wait_for=list(futures.values()))
    results = {name: f.result() for name, f in futures.items()}
    report.result()
    publish(root)
    ran = [n for n, r in results.items() if r["ran"]]
    get_run_logger().info("%d nodes, %d ran, %d from the DVC cache", len(results), len(ran), len(results) - len(ran))
    return {"ran": ran, "nodes": list(results)}


def main() -> None:
    ap = argparse.ArgumentParser(description="Run the comparison of orderings as a Prefect flow (one task per node).")
    ap.add_argument("--repo", default=".", help="project root holding params.yaml and dvc.yaml (default: .)")
    args = ap.parse_args()
    compare(repo=args.repo)


if __name__ == "__main__":
    main()
