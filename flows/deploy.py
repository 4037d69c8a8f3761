"""The comparison flow as a scheduled Prefect deployment (shown in the Prefect UI, parameters editable there).

Served from this process:
    prefect server start --host 127.0.0.1 --port 4200 &      # the UI
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy --cron "0 3 * * *"

On a work pool, run by whichever `prefect worker start --pool NAME` picks it up (process type: the flow runs as a
subprocess of the worker, on the worker's machine):
    python -m flows.deploy --pool nightly --cron "0 3 * * *" --repo /data/compress-pipeline
    prefect worker start --pool nightly
"""
from __future__ import annotations

import argparse
from pathlib import Path
from uuid import UUID

from flows.compare import compare

CODE = Path(__file__).resolve().parents[1]  # the project's code: where a process worker loads the flow from
ENTRYPOINT = "flows/compare.py:compare"


def ensure_process_pool(name: str) -> None:
    """Create the work pool (type process) unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def deploy_to_pool(pool: str, name: str, cron: str, parameters: dict, source: str = str(CODE)) -> UUID:
    """A deployment on a process work pool with a cron schedule; `source` is where the worker finds the code (this
    directory, for a worker on this machine, or a git URL)."""
    ensure_process_pool(pool)
    return compare.from_source(source=source, entrypoint=ENTRYPOINT).deploy(
        name=name, work_pool_name=pool, cron=cron, parameters=parameters, print_next_steps=False)


def main() -> None:
    ap = argparse.ArgumentParser(description="Schedule compare-orderings as a Prefect deployment: served from this "
                                             "process, or (--pool) on a process work pool that `prefect worker start` runs.")
    ap.add_argument("--name", default="nightly-compare", help="deployment name (default: nightly-compare)")
    ap.add_argument("--cron", default="0 3 * * *", help="cron schedule, UTC (default: 03:00 daily); a 6th field is seconds")
    ap.add_argument("--repo", default=".", help="project root the runs use (default: .)")
    ap.add_argument("--orderings", default="", help="comma-separated subset of the orderings (default: all)")
    ap.add_argument("--engine", default="local", choices=["local", "dask", "ray"], help="where the nodes run (default: local)")
    ap.add_argument("--address", default=None, help="an existing Dask scheduler / Ray cluster for engine dask / ray")
    ap.add_argument("--pool", default=None, help="deploy to this process work pool (created if missing) instead of serving")
    ap.add_argument("--source", default=str(CODE), help="with --pool: where the worker gets the code (dir or git URL)")
    args = ap.parse_args()
    parameters = {"repo": str(Path(args.repo).resolve()), "orderings": [o for o in args.orderings.split(",") if o] or None,
                  "engine": args.engine, "address": args.address}
    if args.pool:
        dep = deploy_to_pool(args.pool, args.name, args.cron, parameters, args.source)
        print(f"deployment compare-orderings/{args.name} ({dep}) on work pool {args.pool}: start a worker with "
              f"`prefect worker start --pool {args.pool}`")
    else:
        compare.serve(name=args.name, cron=args.cron, parameters=parameters)


if __name__ == "__main__":
    main()
