"""Evaluation: each function returns a plain dict of metrics."""
