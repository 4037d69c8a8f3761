"""dvc.lock entries as data: read one stage's entry, merge entries into a lock file, and tell from `dvc status`
which stages must run even where their data is absent.

A distributed run moves lock entries, not workspaces: a worker starts from its ancestors' entries, runs its stage,
and hands its own entry back; the driver merges them, so that `dvc pull && dvc repro` anywhere finds nothing to do.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

LOCK = "dvc.lock"
SCHEMA = "2.0"
# `dvc status` says these of data that is only absent here (on the remote or another host), not changed
ABSENT = ("deleted", "not in cache")
DATA_DIRS = ("artifacts/",)  # cached outputs: a driver or a fresh worker holds none of them


def read_entries(repo: Path) -> dict[str, dict]:
    path = Path(repo) / LOCK
    if not path.is_file():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {}) or {}


def write_entries(repo: Path, entries: dict[str, dict], *, replace: bool = False) -> None:
    """Merge `entries` into <repo>/dvc.lock (or replace its stages), atomically."""
    path = Path(repo) / LOCK
    stages = {} if replace else read_entries(repo)
    stages.update(entries)
    tmp = path.with_name(f".{LOCK}.{os.getpid()}")
    tmp.write_text(yaml.safe_dump({"schema": SCHEMA, "stages": stages}, sort_keys=False, width=120))
    os.replace(tmp, path)


@contextmanager
def lockfile_guard(repo: Path) -> Iterator[None]:
    """One writer of dvc.lock at a time among this project's processes (DVC's own lock is not held between calls)."""
    guard = Path(repo) / ".dvc" / "tmp" / "pipeline-dvc-lock.lock"
    guard.parent.mkdir(parents=True, exist_ok=True)
    with open(guard, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _really_changed(change: str | dict) -> bool:
    """One item of a stage's `dvc status`: True unless it only says that cached data is absent."""
    if isinstance(change, str):  # "changed command", "always changed", ...
        return True
    for kind, paths in change.items():
        if kind not in ("changed deps", "changed outs"):
            return True
        for path, status in paths.items():
            if not (isinstance(status, str) and status in ABSENT and path.startswith(DATA_DIRS)):
                return True
    return False


def changed_stages(repo: Path) -> set[str]:
    """Stages whose command, params, code, inputs or metrics differ from dvc.lock, ignoring artifacts that are only
    absent from this workspace (they live on the DVC remote). DVC's own `repro --dry --allow-missing` can't say this:
    it stops at the first changed stage whose parent artifact is absent."""
    proc = subprocess.run(["dvc", "status", "--json"], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc status failed in {repo}: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    status = json.loads(proc.stdout or "{}")
    return {stage for stage, changes in status.items() if any(_really_changed(c) for c in changes)}
