"""Exports others read: GGUF for llama.cpp (``stagecraft export``; docs/export.md)."""

from trainer.export.gguf import FAMILIES, OUTTYPES, export_gguf

__all__ = ["FAMILIES", "OUTTYPES", "export_gguf"]
