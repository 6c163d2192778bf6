"""Planning: per-layer sensitivity, mixed precision under a budget, hardware targets."""
