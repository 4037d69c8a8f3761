"""lm-eval task definitions over the local task data (the YAMLs beside this file) and their loaders (local.py)."""
