"""Writing models out: lowbit checkpoints and engine formats."""
