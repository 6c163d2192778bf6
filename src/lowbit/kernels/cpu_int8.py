"""W8A8 CPU kernels (int8 activations x int8 weights): filled in by the int8 kernel work."""
