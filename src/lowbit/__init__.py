"""lowbit: quantize PyTorch models, run them on integer kernels, and measure what it costs."""

__version__ = "0.1.0"
