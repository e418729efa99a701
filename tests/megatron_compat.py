"""TEST-ONLY: run megatron-core 0.16.1 on CPU by redirecting the CUDA calls it makes to CPU.

megatron-core assumes a GPU even where the maths does not need one: ``torch.cuda.current_device()`` as a
tensor device, ``torch.cuda.synchronize()``, CUDA RNG states, ``Tensor.cuda()`` and
``Tensor.type() == 'torch.cuda.FloatTensor'`` checks (see /work/shared/notes/feasibility.md). This module
patches exactly those for the version it was written against, so the megatron strategy's real code
paths (GPTModel, pipeline schedules, DDP, optimizers, dist_checkpointing) run on gloo CPU processes.

Product code must never import it. ``apply()`` refuses any other megatron-core version. A CUDA call it
does not redirect never silently runs: the ``torch.cuda`` entry points megatron is known to reach
raise ``MegatronCompatError`` naming the call, and anything else hits torch's own "Torch not compiled
with CUDA enabled" (this is a CPU-only build; ``apply()`` refuses to run where CUDA exists).
"""

from __future__ import annotations

import functools
import importlib
import types

import torch

MEGATRON_CORE_VERSION = "0.16.1"
_APPLIED = False


class MegatronCompatError(RuntimeError):
    pass


def _unknown(name: str):
    def fail(*args, **kwargs):
        raise MegatronCompatError(f"tests/megatron_compat.py: megatron-core made a CUDA call it does not redirect: "
                                  f"torch.cuda.{name}{args!r}; extend the compat layer deliberately")
    return fail


def _cpu_type(original):
    """``Tensor.type()`` with no argument answers the CUDA name for CPU tensors (megatron asserts
    'torch.cuda.FloatTensor' etc.); with an argument it converts as usual."""
    @functools.wraps(original)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)
    return type_


# Tensor factories megatron calls with a literal device="cuda"; inside megatron's modules (only) they
# build CPU tensors instead.
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like",
              "full_like", "randn", "rand")
# The megatron modules whose `torch` global is redirected: those the strategy's code paths reach, each
# checked against 0.16.1's source for `device="cuda"` literals.
_MODULES = (
    "megatron.core.transformer.utils", "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication", "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel", "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer", "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads", "megatron.core.optimizer.grad_scaler",
    "megatron.core.dist_checkpointing.exchange_utils", "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.tensor_parallel.data", "megatron.core.utils",
)


def _is_cuda(device) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or (
        isinstance(device, torch.device) and device.type == "cuda")


def _on_cpu(factory):
    @functools.wraps(factory)
    def make(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)
    return make


class _CpuTorch(types.ModuleType):
    """Stands in for `torch` inside the modules in _MODULES: factories with device="cuda" build on CPU,
    every other attribute is torch's own."""

    def __getattr__(self, name):
        attr = getattr(torch, name)
        return _on_cpu(attr) if name in _FACTORIES else attr


def apply() -> None:
    """Install the redirects (idempotent). Call before building any megatron module."""
    global _APPLIED
    if _APPLIED:
        return
    import megatron.core

    version = getattr(megatron.core, "__version__", None)
    if version != MEGATRON_CORE_VERSION:
        raise MegatronCompatError(f"tests/megatron_compat.py was written for megatron-core {MEGATRON_CORE_VERSION}, "
                                  f"found {version}: re-verify every redirect before changing the pin")
    if torch.cuda.is_available():
        raise MegatronCompatError("tests/megatron_compat.py is for CPU-only machines; CUDA is available here")

    from megatron.core.tensor_parallel import random as mrandom
    import megatron.core.tensor_parallel as tensor_parallel

    cuda = torch.cuda
    # Everything megatron 0.16.1 needs on the CPU paths the tests exercise:
    cuda.current_device = lambda: "cpu"  # used as a tensor device
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    # No CUDA generator exists; torch.manual_seed (which itself calls these) seeds the CPU one.
    cuda.manual_seed = lambda seed: None
    cuda.manual_seed_all = lambda seed: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.type = _cpu_type(torch.Tensor.type)
    # Anything else that would reach a CUDA runtime fails loudly, naming itself.
    for name in ("set_device", "stream", "current_stream", "default_stream", "mem_get_info", "get_rng_state",
                 "set_rng_state", "memory_allocated", "max_memory_allocated", "get_device_properties",
                 "get_device_capability", "get_rng_state_all", "set_rng_state_all"):
        setattr(cuda, name, _unknown(name))
    cuda._lazy_init = _unknown("_lazy_init")

    # The CUDA RNG tracker cannot fork CUDA generator states on CPU; the inference tracker does the
    # same bookkeeping without them (dropout is 0 in every test, so no random stream is consumed).
    original_seed = mrandom.model_parallel_cuda_manual_seed

    def seed_on_cpu(seed, *args, **kwargs):
        kwargs["inference_rng_tracker"] = True
        kwargs.setdefault("force_reset_rng", True)
        return original_seed(seed, *args, **kwargs)

    mrandom.model_parallel_cuda_manual_seed = seed_on_cpu
    # Activation recompute saves and restores the "CUDA" RNG state around each recomputed forward;
    # on CPU the CPU generator plays that part.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    tensor_parallel.model_parallel_cuda_manual_seed = seed_on_cpu
    proxy = _CpuTorch("torch")
    for name in _MODULES:
        module = importlib.import_module(name)
        if module.__dict__.get("torch") is not torch:
            raise MegatronCompatError(f"{name} no longer imports torch as `torch`; re-verify the compat layer")
        module.torch = proxy
    _APPLIED = True
