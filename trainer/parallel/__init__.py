"""Process groups (Topology) and the training strategies that apply parallelism to a model."""

from trainer.parallel.topology import MpuAdapter, Topology

__all__ = ["MpuAdapter", "Topology"]
