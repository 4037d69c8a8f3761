"""Print pip constraints that pin every direct dependency of pyproject.toml to the lowest version its range admits
(pip has no `--resolution lowest-direct`; uv has, but ignores the CPU torch wheel on disk and fetches CUDA builds).

    python .ci/lowest_direct.py > /tmp/lowest.txt && pip install -e ".[test]" -c /tmp/lowest.txt
"""
import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
deps = project["dependencies"] + [d for extra in project.get("optional-dependencies", {}).values() for d in extra]
for dep in deps:
    spec = dep.split(";")[0].strip()
    name = re.match(r"[A-Za-z0-9_.\[\]-]+", spec)[0].split("[")[0]
    pinned = re.search(r"==\s*([^,\s]+)", spec)
    lower = re.search(r">=\s*([^,\s]+)", spec)
    if pinned or lower:
        print(f"{name}=={(pinned or lower)[1]}")
    else:
        sys.exit(f"{dep}: give it a lower bound (>=) or a pin (==), so the lowest versions can be tested")
