"""One Prefect task = one DVC stage (`dvc repro --single-item <stage>`): DVC decides whether it must run, caches
its output and records it in dvc.lock; Prefect adds retries, logs and the UI. No Prefect result caching here:
DVC is the cache.

Overlapping flow runs in one workspace: a lock per stage (a file under .dvc/tmp) makes the second run of a stage
wait for the first, then find it up to date; DVC's own "is busy" refusals (a sibling holding a read lock on a shared
parent output) are retried.
"""
from __future__ import annotations

import fcntl
import json
import subprocess
import time
from pathlib import Path

from prefect import get_run_logger, task

BUSY = ("is busy", "Unable to acquire lock")  # DVC's messages when another process holds its locks
BUSY_WAIT_S = 3600
TAIL_LINES = 25


class StageFailed(RuntimeError):
    """A stage's own command failed: deterministic, so not retried (a retry would fail the same way)."""


def stage_failed(stage: str, proc: subprocess.CompletedProcess) -> StageFailed:
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-TAIL_LINES:])
    return StageFailed(f"stage {stage} failed (dvc repro exit {proc.returncode}); its log tail:\n{tail}")


def retry_unless_stage_failed(task, task_run, state) -> bool:
    """Prefect retry condition: retry infrastructure errors (a lost worker, a remote hiccup), not a failed stage."""
    try:
        state.result()
    except StageFailed:
        return False
    except Exception:  # noqa: BLE001 - any other failure is worth one retry
        return True
    return True


def repro(stage: str, repo: str) -> subprocess.CompletedProcess:
    """`dvc repro --single-item <stage>`, one at a time per stage, retried while DVC reports its locks busy."""
    lock = Path(repo) / ".dvc" / "tmp" / f"pipeline-stage-{stage}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["dvc", "--wait-for-lock", "repro", "--single-item", stage]
    deadline = time.monotonic() + BUSY_WAIT_S
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        while True:
            proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
            if proc.returncode == 0 or not any(b in proc.stdout + proc.stderr for b in BUSY) or time.monotonic() > deadline:
                return proc
            time.sleep(2)


@task(name="dvc-stage", task_run_name="{stage}", retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_stage_failed)
def run_dvc_stage(stage: str, repo: str) -> dict:
    """Run (or skip, when up to date) one DVC stage; returns whether it ran and the node's metrics."""
    log = get_run_logger()
    proc = repro(stage, repo)
    if proc.returncode != 0:
        raise stage_failed(stage, proc)
    ran = f"Running stage '{stage}'" in proc.stdout
    log.info("%s: %s", stage, "ran" if ran else "up to date (DVC cache)")
    metrics = Path(repo) / "metrics" / f"{stage}.json"
    return {"stage": stage, "ran": ran, "metrics": json.loads(metrics.read_text()) if metrics.is_file() else None}
