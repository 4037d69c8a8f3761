"""The artifact contract: a node's output directory, written atomically, described by artifact.json.

Layout of artifacts/<node>/:
  config.json, *.safetensors, tokenizer files  the base weights (HF layout; NF4 / GPTQ in their own formats),
                                               absent when the node only adds adapters: then `weights` in
                                               artifact.json points at the artifact that holds them
  peft/lora/                                   LoRA in peft's format
  peft/hybrid.json, peft/*.safetensors         bottleneck adapters and soft prompt
  artifact.json                                the manifest (below): chain, config, parent + fingerprint, state,
                                               and the size + sha256 of every file, checked on every load

Integrity: `verify()` compares each file with the manifest. The fast path trusts a file whose (size, mtime, inode)
matches a hash computed earlier on this machine (a small cache beside the models); any other file is hashed again.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

SCHEMA_VERSION = 2
MANIFEST = "artifact.json"
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "gptqmodel", "datasets")


class ArtifactError(RuntimeError):
    """A missing, stale or corrupt artifact: one line naming it and the fix."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(parent: Path) -> list[Path]:
    """Remove temp dirs left by killed runs (their pid is dead); returns what was removed."""
    removed = []
    for tmp in Path(parent).glob(".*.tmp-*"):
        m = re.search(r"\.tmp-(\d+)$", tmp.name)
        if m and tmp.is_dir() and not _alive(int(m[1])):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


@contextmanager
def node_lock(out: Path) -> Iterator[None]:
    """An exclusive lock per artifact (a file beside it): a second run of the same node waits for the first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temp sibling of `out`; rename it into place only if the block finishes (no half artifacts)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out.parent)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def read_manifest(artifact: Path) -> dict:
    path = Path(artifact) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{artifact}: not an artifact (no {MANIFEST}); run its node first: python -m pipeline run <node>")
    try:
        man = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{path}: corrupt manifest (not JSON); delete {artifact} and run its node again") from None
    if not isinstance(man, dict) or man.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: written by another version of this pipeline (schema {man.get('schema_version') if isinstance(man, dict) else '?'}, "
                            f"need {SCHEMA_VERSION}); run its node again")
    return man


# ---------------------------------------------------------------- checksums
CACHE_DIR = Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress-pipeline"))
HASH_CACHE = CACHE_DIR / "sha256-cache.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _stat_key(path: Path) -> str:
    # no path in the key: renaming a finished temp dir into place keeps its files' hashes valid
    st = path.stat()
    return f"{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"


def _load_hash_cache() -> dict[str, str]:
    try:
        return json.loads(HASH_CACHE.read_text())
    except (OSError, ValueError):
        return {}


def file_hashes(paths: list[Path], *, full: bool = False) -> dict[Path, str]:
    """sha256 of each file; reuses a hash computed earlier for the same (path, size, mtime, inode) unless `full`."""
    cache = _load_hash_cache()
    out, changed = {}, False
    for p in paths:
        key = _stat_key(p)
        if full or key not in cache:
            cache[key] = _sha256(p)
            changed = True
        out[p] = cache[key]
    if changed:  # best effort: concurrent writers may drop each other's entries, which only costs a re-hash
        try:
            HASH_CACHE.parent.mkdir(parents=True, exist_ok=True)
            tmp = HASH_CACHE.with_name(f"{HASH_CACHE.name}.{os.getpid()}")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, HASH_CACHE)
        except OSError:
            pass
    return out


def content_fingerprint(paths: list[Path]) -> str:
    """One hash over the contents of several files (model sources, data files), order-independent by name."""
    paths = sorted(Path(p) for p in paths)
    hashes = file_hashes(paths)
    return fingerprint([[p.name, hashes[p]] for p in paths])


def describe_files(directory: Path) -> dict[str, dict]:
    """Size and sha256 of every file under `directory` but the manifest: what verify() checks later."""
    directory = Path(directory)
    files = sorted(f for f in directory.rglob("*") if f.is_file() and f.name != MANIFEST)
    hashes = file_hashes(files)
    return {str(f.relative_to(directory)): {"size": f.stat().st_size, "sha256": hashes[f]} for f in files}


def verify(artifact: Path, *, full: bool = False) -> dict:
    """The manifest, after checking that every file it lists is present with its size and sha256.
    Raises ArtifactError naming the first bad file."""
    artifact = Path(artifact)
    man = read_manifest(artifact)
    listed = man.get("files")
    if listed is None:
        raise ArtifactError(f"{artifact}: its manifest lists no files (unfinished or old artifact); run its node again")
    paths = []
    for rel, info in listed.items():
        f = artifact / rel
        if not f.is_file():
            raise ArtifactError(f"{f}: missing from artifact {artifact.name}; delete {artifact} and run its node again")
        if f.stat().st_size != info["size"]:
            raise ArtifactError(f"{f}: {f.stat().st_size} bytes, the manifest says {info['size']} (truncated or "
                                f"replaced); delete {artifact} and run its node again")
        paths.append(f)
    hashes = file_hashes(paths, full=full)
    for rel, f in zip(listed, paths):
        if hashes[f] != listed[rel]["sha256"]:
            raise ArtifactError(f"{f}: checksum differs from the manifest (corrupt or modified in place); "
                                f"delete {artifact} and run its node again")
    return man


def weights_dir(artifact: Path) -> Path:
    """The directory that holds this artifact's base weights (itself, or an ancestor it references)."""
    artifact = Path(artifact)
    ref = read_manifest(artifact).get("weights", ".")
    return (artifact / ref).resolve() if ref != "." else artifact.resolve()


def peft_dir(artifact: Path) -> Path:
    return Path(artifact) / "peft"


def seed_dir(artifact: Path, seed: int) -> Path:
    """PEFT parts trained with another seed (a peft stage with several seeds), in the same layout as peft/."""
    return peft_dir(artifact) / "seeds" / str(seed)


def extra_seeds(artifact: Path) -> list[int]:
    root = peft_dir(artifact) / "seeds"
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dir_bytes(path: Path) -> int:
    path = Path(path)
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != MANIFEST)


# the name loads_with gives this project's adapter / prompt code: pipeline/adapters.py here, and the standalone
# hybrid_loader.py (plain torch + transformers) that `python -m pipeline export` writes beside an exported node
HYBRID_LOADER = "hybrid_loader"


def loads_with(man: dict) -> list[str]:
    """What a user needs to load this artifact at the quality the pipeline reports for it, from its manifest:
    transformers, + bitsandbytes (NF4) or optimum + gptqmodel (GPTQ, transformers' own requirements), + peft for
    unmerged LoRA, + the hybrid loader while adapters / a soft prompt remain as modules (not folded by a merge) or
    the embedding is stored as int8 apart from the checkpoint."""
    state = man["state"]
    libs = ["transformers"] + {"nf4": ["bitsandbytes"], "gptq": ["optimum", "gptqmodel"]}.get(man["format"], [])
    if state.get("lora"):
        libs.append("peft")
    if state.get("modules") or state.get("int8_embedding"):
        libs.append(HYBRID_LOADER)
    return libs


def library_versions() -> dict[str, str]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "absent"
    return out


def manifest(*, node: str, chain: list[str], kind: str, config: dict | None, parent: Path | None,
             state: dict, weights: str, fingerprint_: str, stats: dict, timings: dict, files: dict,
             extra: dict | None = None) -> dict:
    parent_fp = read_manifest(parent)["fingerprint"] if parent else None
    return {
        "schema_version": SCHEMA_VERSION,
        "node": node,
        "chain": chain,
        "kind": kind,
        "config": config,
        "parent": str(parent) if parent else None,
        "parent_fingerprint": parent_fp,
        "fingerprint": fingerprint_,
        "weights": weights,
        "state": state,
        "stats": stats,
        "timings": timings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "libraries": library_versions(),
        "files": files,
        **(extra or {}),
    }
