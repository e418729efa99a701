"""Training-throughput benchmark: timed optimizer steps of the stage's strategy on random tokens.

    stagecraft stage=benchmark model=llama_1b parallel=megatron_tp2pp2 parallel.precision=bf16 \
        cluster.nproc_per_node=8 stage.seq_length=4096 stage.global_batch_size=64

Every step is a real SFT step (the long-ce loss over every position, the strategy's forward, backward
and optimizer update) on full-length random sequences, so no padding or data loading is measured. The
first ``stage.untimed_steps`` warm the allocator, kernels and compilation; the next
``stage.timed_steps`` are timed between two barriers (with a device synchronisation).

Model FLOPs per token follow the usual MFU convention (PaLM, Chowdhery et al. 2022, appendix B):
``6 N + 12 L d_attn T``: 6 FLOPs per matmul weight per token (forward 2, backward 4), where N counts
the weights that take part in a matmul (every parameter but the input embedding; a tied embedding
counts once, as the LM head), plus the attention scores and weighted sum, ``2 T d_attn`` each forward
per layer and twice that backward, over the full T x T matrix. Activation recompute is not counted
(that would be hardware FLOPs). MFU = achieved model FLOP/s per device / ``stage.peak_tflops``.

The result (``benchmark.json`` in the stage directory and the stage's return value) is measured again
on every run: a benchmark has no COMPLETE marker and no checkpoints.
"""

from __future__ import annotations

import logging
import resource
import time

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from trainer.checkpoint import write_text_atomic
from trainer.logging.metrics import dumps
from trainer.models import build_model, count_parameters
from trainer.parallel.topology import Topology
from trainer.stages import common
from trainer.stages.sft import micro_batch_loss

log = logging.getLogger(__name__)


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul: all but an untied input embedding (a lookup)."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    return count_parameters(model) - (0 if tied else getattr(embedding, "ds_numel", embedding.numel()))


def flops_per_token(matmul_params: int, hf_config, seq_length: int) -> float:
    """Training model FLOPs per token: ``6 N + 12 L d_attn T`` (see the module docstring)."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    attn_dim = hf_config.num_attention_heads * head_dim
    return 6.0 * matmul_params + 12.0 * hf_config.num_hidden_layers * attn_dim * seq_length


def _random_batch(micro_batch_size: int, seq_length: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Full-length random sequences; every position but the last predicts the next token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (micro_batch_size, seq_length), generator=g)
    mask = torch.ones(micro_batch_size, seq_length)
    mask[:, -1] = 0
    return {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1), "attention_mask": torch.ones_like(ids),
            "loss_mask": mask}


def _sync(topology: Topology) -> None:
    if topology.device.type == "cuda":
        torch.cuda.synchronize()
    topology.barrier()


def _max_over_ranks(value: float, topology: Topology) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=topology.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def run(cfg: DictConfig, topology: Topology) -> dict:
    stage = cfg.stage
    out = common.stage_dir(cfg)
    if topology.is_main:
        common.save_config(cfg, out)
    micro_batches = stage.global_batch_size // (stage.micro_batch_size * topology.dp)
    total = stage.untimed_steps + stage.timed_steps
    sizes = {}

    def make_model():
        model = build_model(cfg.model, stage.vocab_size, cfg.run.seed)
        sizes.update(params=count_parameters(model), matmul=matmul_parameters(model), config=model.config)
        return model

    strategy = common.setup_strategy(cfg, topology, micro_batches, total, make_model)
    vocab = sizes["config"].vocab_size
    batches = [common.to_device(_random_batch(stage.micro_batch_size, stage.seq_length, vocab,
                                              cfg.run.seed + 1000 * topology.dp_rank + k), topology.device)
               for k in range(micro_batches)]
    targets = torch.tensor(float(stage.global_batch_size * (stage.seq_length - 1)), device=topology.device)

    def step() -> float:
        info = strategy.train_step(batches, lambda logps, batch: micro_batch_loss(
            logps, batch, "token", targets, stage.global_batch_size))
        return common.all_reduce_sum(info["loss"], topology.dp_group).item()

    strategy.train()
    losses = [step() for _ in range(stage.untimed_steps)]
    if topology.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(topology)
    start = time.perf_counter()
    losses += [step() for _ in range(stage.timed_steps)]
    _sync(topology)
    elapsed = time.perf_counter() - start

    step_time = elapsed / stage.timed_steps
    tokens_per_s = stage.global_batch_size * stage.seq_length / step_time
    per_device = tokens_per_s / topology.world_size
    tflops = flops_per_token(sizes["matmul"], sizes["config"], stage.seq_length) * per_device / 1e12
    result = {
        "stage": stage.name, "type": "benchmark", "strategy": cfg.parallel.strategy,
        "precision": cfg.parallel.precision, "world_size": topology.world_size,
        "layout": {"tp": topology.tp, "pp": topology.pp, "dp": topology.dp},
        "device": torch.cuda.get_device_name() if topology.device.type == "cuda" else "cpu",
        "parameters": sizes["params"], "matmul_parameters": sizes["matmul"], "seq_length": stage.seq_length,
        "global_batch_size": stage.global_batch_size, "micro_batch_size": stage.micro_batch_size,
        "timed_steps": stage.timed_steps, "step_time_s": step_time, "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": per_device, "model_tflops_per_device": tflops,
        "mfu": tflops / stage.peak_tflops, "peak_tflops": stage.peak_tflops,
        # ru_maxrss is KiB on Linux: the largest resident set of any rank over the whole run.
        "peak_host_memory_gib": _max_over_ranks(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                                                topology),
        "losses": losses,
    }
    if topology.device.type == "cuda":  # over the timed steps, the largest of any rank
        result["peak_device_memory_gib"] = _max_over_ranks(torch.cuda.max_memory_allocated() / 2**30, topology)
    if topology.is_main:
        write_text_atomic(out / "benchmark.json", dumps(result, indent=2))
        log.info("benchmark: %.0f tokens/s (%.0f per device), %.1f model TFLOP/s per device, MFU %.1f%%",
                 tokens_per_s, per_device, tflops, 100 * result["mfu"])
    topology.barrier()
    return result
