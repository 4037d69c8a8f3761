"""Prefect flows: the comparison of orderings, and its scheduled deployment."""
