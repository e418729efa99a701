"""The one object that owns every process group.

``Topology.initialize`` starts torch.distributed (gloo on CPU, nccl on CUDA; a 1-process group when
not launched by torchrun), checks that ``tp * pp * cp * dp == world_size``, and asks megatron-core's
``parallel_state`` to build the tensor / pipeline / context / data-parallel groups. Everything else
(DeepSpeed, losses, data sharding) receives its groups from here rather than from global getters.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import warnings

import torch
import torch.distributed as dist

# megatron-core announces at import that it falls back to plain-torch kernels without Transformer
# Engine / Apex (always the case on CPU); the fallback is what we want, the warnings are noise.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
logging.getLogger("megatron.core").setLevel(logging.WARNING)  # its import-time INFO lines are noise
from megatron.core import parallel_state  # noqa: E402
from omegaconf import DictConfig

from trainer.config.validate import data_parallel_size


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
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=parallel.tp,
                pipeline_model_parallel_size=parallel.pp,
                context_parallel_size=parallel.cp,
                virtual_pipeline_model_parallel_size=parallel.virtual_pp if parallel.virtual_pp > 1 else None,
                # megatron takes whole minutes; the world group above keeps the exact timeout.
                distributed_timeout_minutes=max(1, round(parallel.timeout_minutes)),
            )
        return cls(world_size=world_size, rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                   tp=parallel.tp, pp=parallel.pp, cp=parallel.cp, dp=dp, device=device)

    # Ranks and groups, all from megatron-core's parallel_state (order tp-cp-ep-dp-pp: the ranks of
    # one tensor-parallel group are consecutive, as DeepSpeed AutoTP also assumes).
    @property
    def dp_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    @property
    def tp_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    @property
    def pp_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_rank()

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_data_parallel_group()

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_tensor_model_parallel_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def mpu(self) -> "MpuAdapter":
        return MpuAdapter(self)

    def destroy(self) -> None:
        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


class MpuAdapter:
    """The ``mpu`` interface DeepSpeed expects, answered from the Topology's megatron groups.

    DeepSpeed calls ``get_model_parallel_*`` (megatron's old names) and the data-parallel getters;
    megatron-core's ``parallel_state`` module lacks the former, so it cannot be passed directly.
    """

    def __init__(self, topology: Topology):
        self._topology = topology

    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size()
