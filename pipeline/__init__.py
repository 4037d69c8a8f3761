"""Compression pipeline: orderings of prune / quantize / PEFT / merge / PTQ stages, compared on one artifact contract.

This package is the library; it never imports Prefect (flows/ and tasks/ do).
"""
import logging
import os

# No model or data hub at run time: everything is local files or the package registry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# GPTQModel pulls in torchao, whose import warns about CUDA-only kernels it cannot load on CPU, and torch's pytree
# warns about torchao's enums: noise on every command, nothing a user can act on.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
