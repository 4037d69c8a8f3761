"""The artifact contract: a node's output directory, written atomically, described by artifact.json.

Layout of artifacts/<node>/:
  config.json, *.safetensors, tokenizer files  the base weights (HF layout; NF4 / GPTQ in their own formats),
                                               absent when the node only adds adapters: then `weights` in
                                               artifact.json points at the artifact that holds them
  peft/lora/                                   LoRA in peft's format
  peft/hybrid.json, peft/*.safetensors         bottleneck adapters and soft prompt
  artifact.json                                the manifest (below)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

SCHEMA_VERSION = 1
MANIFEST = "artifact.json"
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "gptqmodel", "datasets")


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temp sibling of `out`; rename it into place only if the block finishes (no half artifacts)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
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
    return json.loads(path.read_text())


def weights_dir(artifact: Path) -> Path:
    """The directory that holds this artifact's base weights (itself, or an ancestor it references)."""
    artifact = Path(artifact)
    ref = read_manifest(artifact).get("weights", ".")
    return (artifact / ref).resolve() if ref != "." else artifact.resolve()


def peft_dir(artifact: Path) -> Path:
    return Path(artifact) / "peft"


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dir_bytes(path: Path) -> int:
    path = Path(path)
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != MANIFEST)


def library_versions() -> dict[str, str]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "absent"
    return out


def manifest(*, node: str, chain: list[str], kind: str, config: dict | None, parent: Path | None,
             state: dict, weights: str, fingerprint_: str, stats: dict, timings: dict, extra: dict | None = None) -> dict:
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
        **(extra or {}),
    }
