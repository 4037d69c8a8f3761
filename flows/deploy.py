"""Serve the comparison flow as a Prefect deployment with a cron schedule (shown in the Prefect UI).

    prefect server start --host 127.0.0.1 --port 4200 &      # the UI
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy --cron "0 3 * * *"
"""
from __future__ import annotations

import argparse
from pathlib import Path

from flows.compare import compare


def main() -> None:
    ap = argparse.ArgumentParser(description="Serve compare-orderings as a scheduled Prefect deployment.")
    ap.add_argument("--name", default="nightly-compare", help="deployment name (default: nightly-compare)")
    ap.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: 03:00 daily)")
    ap.add_argument("--repo", default=".", help="project root the runs use (default: .)")
    args = ap.parse_args()
    compare.serve(name=args.name, cron=args.cron, parameters={"repo": str(Path(args.repo).resolve())})


if __name__ == "__main__":
    main()
