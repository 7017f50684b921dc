"""Sparse-to-dense post-training stages: `python -m stages <stage> ...`."""
