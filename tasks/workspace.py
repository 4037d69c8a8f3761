"""A worker's own checkout of the project: workers share no disk, only git (the code, params, dvc.yaml) and the DVC
remote (the artifacts).

Layout under the workspace root (one per worker, or per host):
    <root>/slot-<i>/   a git checkout, claimed by one task at a time (a worker may run several tasks at once)
    <root>/dvc-cache/  the DVC cache its slots share, so an artifact is downloaded once per root
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ENV_ROOT = "PIPELINE_WORKSPACE"  # set it on a worker to choose where its checkouts live
MAX_SLOTS = 64


def workspace_root() -> Path:
    """$PIPELINE_WORKSPACE, else the Dask worker's own scratch directory (separate per worker), else a temp dir."""
    if os.environ.get(ENV_ROOT):
        return Path(os.environ[ENV_ROOT])
    try:
        from distributed import get_worker

        return Path(get_worker().local_directory) / "compress-pipeline"
    except (ImportError, ValueError):  # not inside a Dask worker
        return Path(tempfile.gettempdir()) / "compress-pipeline-workspace"


@contextmanager
def claim_slot(root: Path) -> Iterator[Path]:
    """The first free slot directory under root, held (flock) until the block ends."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(MAX_SLOTS):
        fh = open(root / f"slot-{i}.lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            continue
        try:
            yield root / f"slot-{i}"
        finally:
            fh.close()
        return
    raise RuntimeError(f"{root}: all {MAX_SLOTS} workspace slots are busy")


def _git(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()[-1000:]}")
    return proc.stdout


def checkout(slot: Path, git_url: str, rev: str, cache_dir: Path) -> Path:
    """Make `slot` a clean checkout of `rev` from `git_url` whose DVC cache is `cache_dir`; returns the repo dir.
    Ignored files (artifacts/, DVC's config.local) stay: DVC overwrites what the lock entries say is different."""
    if not (slot / ".git").is_dir():
        slot.mkdir(parents=True, exist_ok=True)
        _git(["clone", "--quiet", "--no-checkout", git_url, "."], slot)
    _git(["fetch", "--quiet", "--force", "origin", "+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*"], slot)
    if subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=slot).returncode != 0:
        raise RuntimeError(f"commit {rev} is not on any branch of {git_url}: push it (workers check it out from there)")
    _git(["checkout", "--quiet", "--force", "--detach", rev], slot)
    _git(["clean", "--quiet", "-fd"], slot)  # untracked files of an earlier task (metrics); ignored ones stay
    cache_dir.mkdir(parents=True, exist_ok=True)
    local = slot / ".dvc" / "config.local"
    if str(cache_dir) not in (local.read_text() if local.is_file() else ""):  # a dvc call costs ~1 s: once per slot
        subprocess.run(["dvc", "config", "--local", "cache.dir", str(cache_dir)], cwd=slot, check=True,
                       capture_output=True)
    return slot
