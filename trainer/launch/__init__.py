"""Launching runs: planning a layout, torchrun and slurm entry points."""
