"""Sharded save, exact resume, and Hugging Face export."""

from trainer.checkpoint.export import export_hf
from trainer.checkpoint.manager import CheckpointManager, write_text_atomic

__all__ = ["CheckpointManager", "export_hf", "write_text_atomic"]
