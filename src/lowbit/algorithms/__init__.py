"""Quantization algorithms: pure functions that take a weight (and statistics) and a format."""
