"""One Prefect task = one DVC stage, on a worker that shares no disk with the driver or the other workers.

In the worker's own checkout of the driver's commit: write the ancestors' dvc.lock entries (from the driver), pull
their artifacts from the DVC remote, `dvc repro --single-item <stage>` (the local task's locking and retries), push
the stage's artifact, and hand back its lock entry and metrics. The driver merges those into its dvc.lock.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from prefect import get_run_logger, task

from tasks.dvc_lock import read_entries, write_entries
from tasks.dvc_stage import repro, retry_unless_stage_failed, stage_failed
from tasks.workspace import checkout, claim_slot, workspace_root

METRICS = "metrics/{stage}.json"


def _dvc(args: list[str], repo: Path, what: str) -> None:
    proc = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:  # a remote or network problem, not the stage: worth the task's retry
        raise RuntimeError(f"{what} failed (dvc {' '.join(args)}): {(proc.stdout + proc.stderr).strip()[-1500:]}")


@task(name="dvc-stage-remote", task_run_name="{stage}", retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_stage_failed)
def run_remote_stage(stage: str, git_url: str, rev: str, ancestors: list[str], locks: dict[str, dict],
                     remote: str | None = None) -> dict:
    """Run one stage in this worker's checkout of `rev`; `locks` holds the dvc.lock entries of its `ancestors`."""
    log = get_run_logger()
    root = workspace_root()
    remote_args = ["-r", remote] if remote else []
    t0 = time.perf_counter()
    with claim_slot(root) as slot:
        repo = checkout(slot, git_url, rev, root / "dvc-cache")
        # exactly the ancestors' entries: the stage's own (stale) one goes, so DVC runs it
        write_entries(repo, {a: locks[a] for a in ancestors}, replace=True)
        if ancestors:  # every ancestor, not just the parent: a PEFT node's weights live in an ancestor's artifact
            _dvc(["pull", "--force", *remote_args, *ancestors], repo, f"pulling the inputs of {stage}")
        setup_s = time.perf_counter() - t0
        proc = repro(stage, str(repo))
        if proc.returncode != 0:
            raise stage_failed(stage, proc)
        _dvc(["push", *remote_args, stage], repo, f"pushing the artifact of {stage}")
        metrics = repo / METRICS.format(stage=stage)
        result = {
            "stage": stage,
            "ran": f"Running stage '{stage}'" in proc.stdout,
            "lock": read_entries(repo)[stage],
            "metrics_text": metrics.read_text() if metrics.is_file() else None,
            "worker": f"{socket.gethostname()}:{slot}",
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "seconds": {"setup": round(setup_s, 1), "total": round(time.perf_counter() - t0, 1)},
        }
    log.info("%s: %s on %s (%.0f s, %.0f s of it checkout + pull)", stage, "ran" if result["ran"] else "restored",
             result["worker"], result["seconds"]["total"], setup_s)
    return result
