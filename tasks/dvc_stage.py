"""One Prefect task = one DVC stage (`dvc repro --single-item <stage>`): DVC decides whether it must run, caches
its output and records it in dvc.lock; Prefect adds retries, logs and the UI. No Prefect result caching here:
DVC is the cache.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from prefect import get_run_logger, task


@task(name="dvc-stage", task_run_name="{stage}", retries=1, retry_delay_seconds=5)
def run_dvc_stage(stage: str, repo: str) -> dict:
    """Run (or skip, when up to date) one DVC stage; returns whether it ran and the node's metrics."""
    log = get_run_logger()
    # --wait-for-lock: sibling branches submitted at once queue on DVC's repo lock instead of failing on it
    cmd = ["dvc", "--wait-for-lock", "repro", "--single-item", stage]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
    ran = f"Running stage '{stage}'" in proc.stdout
    log.info("%s: %s", stage, "ran" if ran else "up to date (DVC cache)")
    metrics = Path(repo) / "metrics" / f"{stage}.json"
    return {"stage": stage, "ran": ran, "metrics": json.loads(metrics.read_text()) if metrics.is_file() else None}
