"""metrics.jsonl, wandb (offline by default) and console progress."""

from trainer.logging.metrics import MetricsLogger, read_metrics

__all__ = ["MetricsLogger", "read_metrics"]
