"""The one object that owns every process group.

``Topology.initialize`` starts torch.distributed (gloo on CPU, nccl on CUDA; a 1-process group when
not launched by torchrun), checks that ``tp * pp * cp * dp == world_size`` and builds the groups the
strategy needs. The megatron strategy gets them from megatron-core's ``parallel_state`` (its layers
read those globals themselves). The deepspeed strategy has only tensor and data parallelism, and gets
two families of plain torch groups in the same rank order (the ranks of one tensor-parallel group
consecutive, as DeepSpeed AutoTP also assumes): importing megatron-core costs ≈ 2.8 s of start-up
and ≈ 140 MiB of memory in every process (docs/performance.md), for groups torch builds in a few lines.
Everything else (DeepSpeed, losses, data sharding) receives its ranks and groups as fields of this
object rather than from global getters.
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from trainer.config.validate import data_parallel_size


def _parallel_state():
    """megatron-core's parallel_state, imported only on the megatron path."""
    # megatron-core announces at import that it falls back to plain-torch kernels without Transformer
    # Engine / Apex (always the case on CPU); the fallback is what we want, the warnings are noise.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # its import-time INFO lines are noise
    from megatron.core import parallel_state

    return parallel_state


def _resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("parallel.device=cuda but torch sees no CUDA device")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    local_rank: int
    tp: int
    pp: int
    cp: int
    dp: int
    device: torch.device
    # This rank's place in each dimension and its groups (None = the world group, as on one process).
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    megatron: bool = False  # the groups live in megatron-core's parallel_state

    @classmethod
    def initialize(cls, parallel: DictConfig) -> "Topology":
        """Process groups whose collectives give up after ``parallel.timeout_minutes`` (a hung or dead
        rank then fails the run instead of holding the job until the scheduler's limit)."""
        timeout = datetime.timedelta(minutes=parallel.timeout_minutes)
        device = _resolve_device(parallel.device)
        backend = parallel.backend if parallel.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            if "RANK" in os.environ:
                dist.init_process_group(backend, timeout=timeout)
            else:
                # Not under torchrun: a 1-process group, so DeepSpeed and the collectives in the
                # stage code run unchanged (DeepSpeed also insists on a LOCAL_RANK).
                os.environ.setdefault("LOCAL_RANK", "0")
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        world_size = dist.get_world_size()
        # Raises ConfigError naming parallel.* when the layout does not tile the world.
        dp = data_parallel_size(DictConfig({"parallel": parallel}), world_size)
        common = dict(world_size=world_size, rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                      tp=parallel.tp, pp=parallel.pp, cp=parallel.cp, dp=dp, device=device)
        if parallel.strategy == "megatron":
            return cls(**common, **_megatron_groups(parallel))
        return cls(**common, **_tp_dp_groups(parallel.tp, dp, timeout))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def mpu(self) -> "MpuAdapter":
        return MpuAdapter(self)

    def destroy(self) -> None:
        if self.megatron:
            _parallel_state().destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def _megatron_groups(parallel: DictConfig) -> dict:
    """Ranks and groups from megatron-core's parallel_state (order tp-cp-ep-dp-pp)."""
    ps = _parallel_state()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            context_parallel_size=parallel.cp,
            virtual_pipeline_model_parallel_size=parallel.virtual_pp if parallel.virtual_pp > 1 else None,
            # megatron takes whole minutes; the world group above keeps the exact timeout.
            distributed_timeout_minutes=max(1, round(parallel.timeout_minutes)),
        )
    return dict(tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
                dp_rank=ps.get_data_parallel_rank(), tp_group=ps.get_tensor_model_parallel_group(),
                dp_group=ps.get_data_parallel_group(), megatron=True)


def _tp_dp_groups(tp: int, dp: int, timeout: datetime.timedelta) -> dict:
    """Tensor-parallel groups of consecutive ranks and data-parallel groups strided by ``tp`` — the
    order megatron-core uses for tp x dp — for the deepspeed strategy.

    Every rank creates every group, in the same order (``new_group`` is collective over the world).
    """
    rank = dist.get_rank()
    tp_ranks = [[d * tp + t for t in range(tp)] for d in range(dp)]
    dp_ranks = [[d * tp + t for d in range(dp)] for t in range(tp)]
    mine = {}
    for kind, families in (("tp", tp_ranks), ("dp", dp_ranks)):
        for ranks in families:
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine[kind] = group
    return dict(tp_rank=rank % tp, pp_rank=0, dp_rank=rank // tp, tp_group=mine["tp"], dp_group=mine["dp"])


class MpuAdapter:
    """The ``mpu`` interface DeepSpeed expects, answered from the Topology's fields.

    DeepSpeed calls ``get_model_parallel_*`` (megatron's old names) and the data-parallel getters;
    megatron-core's ``parallel_state`` module lacks the former, so it could not be passed directly even
    where it holds the groups.
    """

    def __init__(self, topology: Topology):
        self._topology = topology

    def get_model_parallel_rank(self) -> int:
        return self._topology.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self._topology.tp

    def get_model_parallel_group(self):
        return self._topology.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self._topology.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self._topology.dp

    def get_data_parallel_group(self):
        return self._topology.dp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._topology.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._topology.pp
