"""Weight-only and lookup-table CPU kernels: filled in by the weight-only kernel work."""
