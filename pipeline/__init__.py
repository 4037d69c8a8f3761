"""Compression pipeline: orderings of prune / quantize / PEFT / merge / PTQ stages, compared on one artifact contract.

This package is the library; it never imports Prefect (flows/ and tasks/ do).
"""
import os

# No model or data hub at run time: everything is local files or the package registry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
