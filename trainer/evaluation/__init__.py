"""Evaluation of any HF export: lm-evaluation-harness tasks offline, and LongWriter-style length
following (``stagecraft eval``; docs/evaluation.md)."""

from trainer.evaluation.length_following import length_following_score

__all__ = ["length_following_score"]
