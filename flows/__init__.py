"""Prefect flows: the comparison of orderings (on local threads or Dask / Ray workers), and its deployments."""
import os

# No network here: Prefect's telemetry would fail; the first ephemeral server start migrates SQLite slowly.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
