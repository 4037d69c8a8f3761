"""Prefect tasks: thin wrappers that run one DVC stage each, so Prefect and `dvc repro` share one cache and result."""
