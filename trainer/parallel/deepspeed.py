"""Strategy ``deepspeed``: a Hugging Face CausalLM wrapped by a DeepSpeed engine.

ZeRO 0-3, fp32/bf16, optional CPU optimizer offload, activation checkpointing, gradient accumulation
and clipping, and tensor parallelism through DeepSpeed AutoTP. Parallelism is applied here, from
outside the model; the data-parallel group comes from the Topology through the mpu adapter.

The strategy owns the micro-batch loop (``train_step``) and hands stage losses per-token log-probs,
the interface a pipeline-parallel strategy can also honour without gathering full-vocabulary logits.

Gradient scale: DeepSpeed divides each micro-batch loss by the accumulation steps and averages
gradients over the data-parallel group. Stage losses are already normalised by GLOBAL quantities
(tokens or sequences of the whole global batch), so :meth:`backward` multiplies by ``dp * accum`` to
undo both and make the applied gradient the gradient of the global-batch loss.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
from deepspeed.runtime.utils import is_model_parallel_parameter
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LambdaLR

from trainer.data.prefix_sharing import attention_bias
from trainer.losses import token_logps
from trainer.losses.chunked import chunked_token_logps, fused_token_logps
from trainer.models import segment_attention
from trainer.models.hf import logits_are_head_output
from trainer.models.reward import reward_inputs
from trainer.parallel.schedule import lr_multiplier
from trainer.parallel.strategy import LossFn, poison_nonfinite
from trainer.parallel.topology import Topology

log = logging.getLogger(__name__)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms, biases and other 1-D parameters are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_ds_config(parallel: DictConfig, optim: DictConfig, micro_batch_size: int,
                    grad_accum: int) -> dict[str, Any]:
    """The DeepSpeed config. ``train_batch_size`` is left for DeepSpeed to derive: with AutoTP it
    counts every rank (TP included) in its batch arithmetic, without it only data-parallel ranks."""
    zero: dict[str, Any] = {"stage": parallel.zero_stage}
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if parallel.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    optimizer_params: dict[str, Any] = {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                                        "weight_decay": optim.weight_decay}
    if not parallel.offload_optimizer:
        # torch.optim.AdamW: identical maths, and no JIT build of FusedAdam (absent on CPU). fused: one
        # kernel per parameter for the whole update instead of ~8 tensor ops (torch >= 2.4 has it on CPU
        # and CUDA); on the benchmark's 6.3M parameters 9.5 -> 2.6 ms a step (benchmarks/micro.py adamw), values equal to ~1 ulp.
        optimizer_params["torch_adam"] = True
        optimizer_params["fused"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "bf16": {"enabled": parallel.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return config


# DeepSpeed's own partition plan for Phi3 (transformers' plan for it needs `rowwise_split_input`, which
# DeepSpeed refuses): the MLP is tensor-parallel, [gate_r; up_r] per rank so that Phi3MLP's chunk(2)
# splits its local output correctly, and attention stays whole on every rank, because Phi3Attention
# cuts its fused qkv output at config.num_attention_heads * head_dim, a global count from the shared
# model config that no shard can change. Replicated weights see identical inputs and output gradients
# on every TP rank, so their gradients agree without a reduction.
_PHI3_PLAN = {"use_default_specs": False, "layer_specs": [
    {"patterns": [r".*\.mlp\.gate_up_proj\.weight$"], "partition_type": "column", "shape": [2, -1],
     "partition_dim": 0},
    {"patterns": [r".*\.mlp\.down_proj\.weight$"], "partition_type": "row"},
    {"patterns": [r".*\.self_attn\.(qkv|o)_proj\.weight$"], "partition_type": "skip"},
    {"patterns": [r".*lm_head\.weight$"], "partition_type": "column", "gather_output": True}]}


def autotp_section(hf_config, tp: int) -> dict[str, Any]:
    """DeepSpeed's ``tensor_parallel`` config for a model of this transformers config, or a refusal.

    DeepSpeed AutoTP follows the model's transformers tensor-parallel plan (``base_model_tp_plan``).
    Two choices of ours:

    - ``vocab_parallel_lm_head: false``. The stage losses read per-token log-probs from
      full-vocabulary logits. For a tied embedding DeepSpeed's default shards the head by vocabulary
      and swaps in its own loss, so each rank would see half the logits (measured on Qwen2:
      ``IndexError: Target 294 is out of bounds``). With false, a tied head and its embedding stay
      replicated (identical inputs, so identical gradients on every TP rank); an untied head is
      column-parallel with gathered logits.
    - Phi3 gets :data:`_PHI3_PLAN`. Any other plan with a style DeepSpeed cannot apply (fused
      ``packed_colwise`` projections, ``rowwise_split_input``, expert parallel, ...) is refused here,
      before the engine starts, with the alternatives.
    """
    from deepspeed.module_inject.tp_plan_converter import SUPPORTED_STYLES

    section: dict[str, Any] = {"autotp_size": tp, "vocab_parallel_lm_head": False}
    kind = getattr(hf_config, "model_type", "?")
    if kind == "phi3":
        return {**section, "partition_config": _PHI3_PLAN}
    plan = getattr(hf_config, "base_model_tp_plan", None) or {}
    unsupported = sorted({style for style in plan.values() if style.lower() not in SUPPORTED_STYLES})
    # Expert weights: older transformers plans name them with styles DeepSpeed lacks; newer ones leave
    # them out of the plan (transformers 5.25's qwen2_moe), which would keep every expert unsharded.
    experts = next((getattr(hf_config, k) for k in _EXPERT_COUNT_KEYS if getattr(hf_config, k, None)), None)
    if unsupported or experts:
        why = (f"its transformers tensor-parallel plan needs {', '.join(unsupported)}, which DeepSpeed "
               f"{deepspeed.__version__} does not implement" if unsupported else
               f"its {experts} experts per layer are not in its transformers tensor-parallel plan, so DeepSpeed "
               f"{deepspeed.__version__} would leave every expert unsharded")
        raise NotImplementedError(
            f"parallel.tp: model.arch={kind!r} cannot use DeepSpeed AutoTP: {why}. Use parallel.tp=1 with "
            f"ZeRO-3 (parallel=zero3), or parallel.strategy=megatron for llama, qwen2, mistral and nemotron")
    return section


# Config fields that count a mixture-of-experts layer's experts (Qwen2-MoE / Qwen3-MoE, Mixtral,
# DeepSeek-V2/V3).
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def _to_universal(source: Path, output: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` in this process, serially (one worker: no process pool to fork
    from a distributed worker). ``inject_missing_state``: a plain HF model records no universal-checkpoint
    info of its own (AutoTP does); the default, version-only info is right for unsharded parameters."""
    from deepspeed.checkpoint import ds_to_universal

    output.parent.mkdir(parents=True, exist_ok=True)
    # main() also writes a ``latest_universal`` pointer next to ``output``, i.e. inside our own directory.
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(source), output_folder=str(output), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True))


def _unshare_steps(optimizer) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal load gives every parameter group the SAME ``step`` tensor; torch
    AdamW increments its step in place once per group, so shared it would run ahead by the number of
    groups each step and skew Adam's bias correction (measured: the loss two steps after resume off by
    6e-3). Each state gets its own copy."""
    base = getattr(optimizer, "optimizer", optimizer)
    for state in base.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


@contextlib.contextmanager
def _bypassed(head: torch.nn.Module):
    """The head returns its input while inside: the engine's forward then yields the decoder's final
    hidden states as ``logits``, for the chunked head to turn into log-probs.

    Why through the engine and not by calling ``get_decoder()`` alone: DeepSpeed's ``engine.forward``
    does per-micro-batch bookkeeping that gradient accumulation depends on (ZeRO's
    ``clear_backward_seen_flag``, which advances ZeRO-3's micro-step, and the output hooks that run the
    backward prologue). Measured without it: ZeRO-3 with 2 micro-batches a step trained a different
    trajectory from step 2 on (SFT loss 5.88 against 5.85). The head's own ZeRO-3 hooks still fire
    around the identity call, so every rank makes the same collectives."""
    head.forward = lambda hidden: hidden  # an instance attribute: nn.Module.__call__ looks it up first
    try:
        yield
    finally:
        del head.forward


class DeepSpeedStrategy:
    """Owns the DeepSpeed engine of one model for one stage."""

    def __init__(self, parallel: DictConfig, topology: Topology):
        self.parallel = parallel
        self.topology = topology
        self.engine = None
        self.grad_accum = 1
        self._hf_zero3 = None
        self._zero_missing_grads = False

    def model_init_context(self, micro_batch_size: int, grad_accum: int, pretrained: bool):
        """Where the stage builds its model. Under ZeRO-3 a pretrained model is loaded straight into
        its partitions (transformers' ``HfDeepSpeedConfig`` -> ``deepspeed.zero.Init``), so no rank ever
        holds the full weights; a model built from config keeps the plain seeded init, identical on
        every rank and to a 1-process run."""
        if self.parallel.zero_stage != 3 or not pretrained:
            return contextlib.nullcontext()
        from transformers.integrations import HfDeepSpeedConfig

        config = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": grad_accum,
                  "zero_optimization": {"stage": 3}, "bf16": {"enabled": self.parallel.precision == "bf16"}}
        # transformers holds only a weak reference; it must stay alive for the engine's lifetime.
        self._hf_zero3 = HfDeepSpeedConfig(config)
        return contextlib.nullcontext()

    def setup(self, model: torch.nn.Module, optim: DictConfig, micro_batch_size: int, grad_accum: int,
              total_steps: int) -> None:
        if self.parallel.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self._hf_zero3 is None:  # zero.Init already placed and typed the partitions
            if self.parallel.precision == "bf16":
                model.to(torch.bfloat16)
            model.to(self.topology.device)
        self.grad_accum = grad_accum
        config = build_ds_config(self.parallel, optim, micro_batch_size, grad_accum)
        if self.parallel.tp > 1:
            config["tensor_parallel"] = autotp_section(model.config, self.parallel.tp)
        schedule = functools.partial(lr_multiplier, total_steps=total_steps, warmup_steps=optim.warmup_steps,
                                     schedule=optim.schedule, min_lr_ratio=optim.min_lr_ratio)
        # With AutoTP DeepSpeed builds its own TP/DP groups (consecutive ranks per TP group, the same
        # layout as the Topology's); otherwise it takes ours.
        mpu = self.topology.mpu() if self.parallel.tp == 1 else None
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=_param_groups(model, optim.weight_decay), config=config,
            lr_scheduler=lambda opt: LambdaLR(opt, schedule), mpu=mpu, dist_init_required=False)
        self._skip_allreduce()
        if self.parallel.tp > 1:
            from deepspeed.utils import groups
            if groups.get_data_parallel_rank() != self.topology.dp_rank:
                raise RuntimeError("DeepSpeed AutoTP laid out its data-parallel groups differently from the "
                                   "Topology; data shards would not match tensor-parallel groups")

    def _skip_allreduce(self) -> None:
        """One data-parallel rank and unpartitioned gradients (ZeRO-0): DeepSpeed's all-reduce at each
        accumulation boundary would flatten every gradient into one buffer, all-reduce it over a group of
        one, divide it by 1 and copy it back, a second copy of the gradients at peak and 2.4 % of the SFT
        benchmark's run (py-spy). Turned off; its one other effect, a zero gradient for a trainable
        parameter the forward did not reach (AdamW then still decays it and its moments), is kept by
        :meth:`_step`, so the trajectory is the same bit for bit (tests/test_fast_paths.py)."""
        engine = self.engine
        self._zero_missing_grads = False
        if (self.parallel.zero_stage == 0 and self.topology.dp == 1 and not engine.has_moe_layers
                and engine.sequence_parallel_size == 1 and engine.enable_backward_allreduce):
            engine.enable_backward_allreduce = False
            # the bf16 optimizer accumulates into its own fp32 buffers, missing gradients as zeros
            self._zero_missing_grads = not hasattr(engine.optimizer, "get_grads_for_reduction")

    def setup_inference(self, model: torch.nn.Module, micro_batch_size: int) -> None:
        """A forward-only engine (a reference model): no optimizer; ZeRO-3 partitions the weights when
        the run uses ZeRO-3, AutoTP shards them when tp > 1, otherwise every rank holds a copy."""
        if self._hf_zero3 is None:
            if self.parallel.precision == "bf16":
                model.to(torch.bfloat16)
            model.to(self.topology.device)
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3 if self.parallel.zero_stage == 3 else 0},
            "bf16": {"enabled": self.parallel.precision == "bf16"}, "steps_per_print": 10**9}
        if self.parallel.tp > 1:
            config["tensor_parallel"] = autotp_section(model.config, self.parallel.tp)
        mpu = self.topology.mpu() if self.parallel.tp == 1 else None
        self.engine, _, _, _ = deepspeed.initialize(model=model, config=config, mpu=mpu, dist_init_required=False)
        self.engine.eval()

    @property
    def module(self) -> torch.nn.Module:
        """The (wrapped-in-place) Hugging Face model."""
        return self.engine.module

    def from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor  # no pipeline stages

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def token_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p(labels | context) per position, [B, T]; differentiable (no_grad is the caller's).

        Three layouts: padded rows (``attention_mask``); packed rows (``position_ids`` restarting per
        sequence, trainer.data.packing); prompt-shared rows (``block``/``branch``,
        trainer.data.prefix_sharing). The last two attend per segment, their real positions laid end to
        end in one row without padding (trainer.models.segment_attention), or through a mask
        (:meth:`_attention_inputs`). With ``parallel.logits_chunk_tokens`` > 0 (the default) and a model
        whose logits are its head's output, log-probs come from the decoder's hidden states and the head
        in chunks of that many tokens (trainer.losses.chunked: a hand-written backward with the head's
        weight below ZeRO-3; under ZeRO-3 the head called as a module, under checkpoint, so its hooks
        gather the weight). AutoTP (tp > 1) keeps full logits, its head is wrapped by DeepSpeed.

        The chunked head runs only at the positions a loss reads (``loss_mask`` != 0): prompt, user-turn
        and padding positions get log-prob 0 without their [V] logits (the Strategy contract). A
        micro-batch with no such position keeps them all, so every rank still makes the head's calls
        and gradients."""
        scored = batch["loss_mask"] != 0 if "loss_mask" in batch else None
        if "position_ids" in batch and self._segment_attention():
            real, input_ids, labels, inputs = segment_attention.one_row(batch)
            scored = None if scored is None else scored[real][None]
            return segment_attention.spread(self._token_logps(input_ids, labels, inputs, scored), real)
        return self._token_logps(batch["input_ids"], batch["labels"], self._attention_inputs(batch), scored)

    def _token_logps(self, input_ids: torch.Tensor, labels: torch.Tensor, inputs: dict[str, Any],
                     scored: torch.Tensor | None) -> torch.Tensor:
        chunk = self.parallel.logits_chunk_tokens if self.parallel.tp == 1 else 0
        if chunk <= 0 or not logits_are_head_output(self.module):
            return token_logps(self.engine(input_ids=input_ids, use_cache=False, **inputs).logits, labels)
        head = self.module.get_output_embeddings()
        with _bypassed(head):
            hidden = self.engine(input_ids=input_ids, use_cache=False, **inputs).logits
        kept = -1 if scored is None else int(scored.sum())  # one device sync
        if 0 < kept < scored.numel():
            # The head and its softmax over V at the scored positions only (the gather's backward
            # scatters their gradients back): on the DPO benchmark's multi-turn pairs 55 % of the
            # positions are prompt.
            picked = self._head_logps(hidden[scored][None], labels[scored][None], head, chunk)
            return picked.new_zeros(labels.shape).masked_scatter(scored, picked[0])
        return self._head_logps(hidden, labels, head, chunk)

    def _head_logps(self, hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk: int) -> torch.Tensor:
        if self.parallel.zero_stage < 3:
            # The head's weight read directly, log-softmax and its gradient by hand, chunk by chunk.
            return fused_token_logps(hidden, head.weight, head.bias, labels, chunk)
        # ZeRO-3: the head is called as a module, so its hooks gather the partitioned weight per chunk.
        tokens = labels.numel()
        if self.topology.dp > 1:
            # Each head call gathers ZeRO-3 partitions (a collective): all ranks take the same path and
            # make the same number of calls, set by the largest micro-batch (one scalar all-reduce).
            most = torch.tensor(tokens, device=self.topology.device)
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX, group=self.topology.dp_group)
            tokens = int(most.item())
        return chunked_token_logps(hidden, head, labels, chunk, num_chunks=-(-tokens // chunk))

    def _segment_attention(self) -> bool:
        if not (self.parallel.segment_attention and segment_attention.supported(self.module.config)):
            return False
        segment_attention.register()
        return True

    def _attention_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """What the decoder takes besides input_ids for padded rows (their attention mask) and, without
        segment attention, for packed rows (their position ids: transformers builds the per-sequence mask
        from them) and prompt-shared rows (the 4D mask of trainer.data.prefix_sharing)."""
        if "position_ids" not in batch:
            return {"attention_mask": batch["attention_mask"]}
        inputs: dict[str, Any] = {"position_ids": batch["position_ids"]}
        if "branch" in batch:
            dtype = torch.bfloat16 if self.parallel.precision == "bf16" else torch.float32
            inputs["attention_mask"] = attention_bias(batch["block"], batch["branch"], dtype)
        return inputs

    def outputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the stage's loss consumes: per-token log-probs [B, T] for a CausalLM; for a model
        that declares ``is_reward_model`` (trainer.models.reward), its attribute scores [B, A]."""
        if getattr(self.module, "is_reward_model", False):
            return self.engine(**reward_inputs(batch, self._segment_attention()))
        return self.token_logps(batch)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | list[int], pad_token_id: int) -> torch.Tensor:
        """Greedy continuation (prompt included), [B, prompt + new]; a row ends at any of the
        ``eos_token_id`` ids (transformers takes a list as it is). A collective under ZeRO-3 / TP."""
        return self.module.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True,
            # ZeRO-3 gathers parameters inside forward: ranks must keep stepping until all are done.
            synced_gpus=self.parallel.zero_stage == 3 and self.topology.world_size > 1)

    def train_step(self, batches: list[dict[str, torch.Tensor]], loss_fn: LossFn,
                   on_micro_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches.

        ``loss_fn(outputs, batch)`` (outputs: see :meth:`outputs`) returns the micro-batch's share of the global-batch loss (the
        shares over all micro-batches and ranks sum to it). Returns the local sum of the shares as
        ``loss`` (a tensor; the stage reduces it over data-parallel ranks), the grad norm and the LR.
        """
        total = torch.zeros((), dtype=torch.float64)
        info: dict[str, Any] = {}
        for k, batch in enumerate(batches):
            if on_micro_batch is not None:
                on_micro_batch(k)
            loss = loss_fn(self.outputs(batch), batch)
            # Undo DeepSpeed's 1/accum loss scale and 1/dp gradient average (see module docstring); a
            # non-finite loss poisons the gradients, so the step's norm check sees it on every rank.
            self.engine.backward(loss * poison_nonfinite(loss, self.topology.dp * self.grad_accum))
            info = self._step() or info
            total += loss.detach().double().cpu()
        return {"loss": total, **info}

    def _step(self) -> dict[str, float] | None:
        """Advance the engine; at an accumulation boundary returns the step's grad norm and LR."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        lr = self.engine.get_lr()[0]
        grad_norm, skipped = None, False
        if boundary and self._zero_missing_grads:
            for param in self.module.parameters():
                if param.requires_grad and param.grad is None and param.numel():
                    param.grad = torch.zeros_like(param)
        if boundary and self.parallel.zero_stage == 0 and self.parallel.precision == "fp32":
            # DeepSpeed clips plain fp32 gradients without keeping the norm, and applies non-finite
            # ones: measure the norm before step() frees the gradients (TP-aware through the engine's
            # mpu), and skip a non-finite step by dropping its gradients — torch's AdamW leaves a
            # parameter without a gradient untouched, moments and step count included.
            grad_norm = self._grad_norm()
            skipped = not math.isfinite(grad_norm)
        if skipped:
            self.engine.optimizer.zero_grad(set_to_none=True)
            # DeepSpeed's fp32 clipping indexes the first parameter with a gradient: off for this step.
            clip, self.engine._config.gradient_clipping = self.engine._config.gradient_clipping, 0.0
            try:
                self.engine.step()
            finally:
                self.engine._config.gradient_clipping = clip
        else:
            self.engine.step()
        if not boundary:
            return None
        if not skipped and not self.engine.was_step_applied():
            # The ZeRO and bf16 optimizers skip non-finite steps themselves, and then leave the LR
            # schedule behind; advance it, so that LR stays a function of the step.
            skipped = True
            self.engine.lr_scheduler.step()
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
            grad_norm = float("nan") if grad_norm is None else grad_norm  # inf after a skipped ZeRO step
        return {"grad_norm": float(grad_norm), "lr": lr, "skipped": skipped}

    def _grad_norm(self) -> float:
        """L2 norm of the (already data-parallel-reduced) gradients; TP-sharded ones summed over the
        tensor-parallel group, replicated ones counted once."""
        tp_rank = self.topology.tp_rank if self.parallel.tp > 1 else 0
        grads = [param.grad.detach() for param in self.module.parameters()
                 if param.grad is not None and (tp_rank == 0 or is_model_parallel_parameter(param))]
        # Each tensor's norm in its own dtype (one multi-tensor call), their squares summed in fp64.
        total = torch.zeros((), dtype=torch.float64, device=self.topology.device)
        if grads:
            total += torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()
        if self.parallel.tp > 1:
            torch.distributed.all_reduce(total, group=self.topology.tp_group)
        return total.sqrt().item()

    def save(self, ckpt_dir: Path, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)

    def load(self, ckpt_dir: Path, tag: str, saved: dict | None = None) -> dict:
        """Restore weights, optimizer, LR schedule and DeepSpeed's counters; returns the client state.

        ``saved``: the layout that wrote the checkpoint (its COMPLETE marker; None: this one). The same
        layout loads DeepSpeed's shards as they are (bit-exact). Another data-parallel size or tp goes
        through DeepSpeed's universal format: ZeRO partitions are cut by the DP size, and AutoTP shards by
        tp, so the shards are first merged into whole per-parameter tensors (fp32 weight, Adam moments,
        step), which every rank then slices for the new layout. ZeRO-0 keeps every optimizer state whole
        in each tp rank's file, so it loads across DP sizes as it is; it has no ZeRO shards to convert."""
        ckpt_dir = Path(ckpt_dir)
        if saved is None or (saved["dp"] == self.topology.dp and saved["tp"] == self.parallel.tp):
            return self._load(ckpt_dir, tag)
        change = (f"was written with dp={saved['dp']} tp={saved['tp']} and this run has dp={self.topology.dp} "
                  f"tp={self.parallel.tp}")
        if self.parallel.zero_stage == 0:
            if saved["tp"] == self.parallel.tp:
                return self._load(ckpt_dir, tag)
            raise RuntimeError(
                f"checkpoint {ckpt_dir / tag} {change}. A ZeRO-0 checkpoint has no ZeRO shards for DeepSpeed's "
                f"universal conversion to merge across a tp change: resume it with parallel.tp={saved['tp']} "
                "(any data-parallel size), or train with parallel.zero_stage 1-3 to change tp later")
        universal = self._universal(ckpt_dir, tag, change)
        self.engine._config.load_universal_checkpoint = True  # what load_checkpoint reads; no public setter
        try:
            client_state = self._load(universal, tag)
        finally:
            self.engine._config.load_universal_checkpoint = False
        _unshare_steps(self.engine.optimizer)
        return client_state

    def _load(self, ckpt_dir: Path, tag: str) -> dict:
        path, client_state = self.engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
        return client_state

    def _universal(self, ckpt_dir: Path, tag: str, change: str) -> Path:
        """``<ckpt_dir>/<tag>.universal``, holding ``<tag>/`` in DeepSpeed's universal format; converted
        by rank 0 while the other ranks wait, and reused by later resumes from the same checkpoint (its
        ``SOURCE`` is the checkpoint's manifest, so a checkpoint re-written under the same tag is
        converted afresh). Written under ``.partial`` and renamed: a crash mid-conversion is redone,
        never loaded. ``change``: the layout change, for the error message."""
        final = ckpt_dir / f"{tag}.universal"
        error = None
        if self.topology.is_main:
            source = next((ckpt_dir / tag / name for name in ("manifest.json", "COMPLETE")
                           if (ckpt_dir / tag / name).is_file()), None)
            identity = source.read_text() if source is not None else ""
            if not (final / "SOURCE").is_file() or (final / "SOURCE").read_text() != identity:
                shutil.rmtree(final, ignore_errors=True)
                partial = ckpt_dir / f"{tag}.universal.partial"
                shutil.rmtree(partial, ignore_errors=True)
                started = time.perf_counter()
                try:
                    _to_universal(ckpt_dir / tag, partial / tag)
                    (partial / "SOURCE").write_text(identity)
                    os.rename(partial, final)
                    log.info("converted %s to a universal checkpoint in %.1f s", ckpt_dir / tag,
                             time.perf_counter() - started)
                except Exception as err:  # reported on every rank below, not left to hang the others
                    shutil.rmtree(partial, ignore_errors=True)
                    error = f"{type(err).__name__}: {err}"
        verdict = [error]
        torch.distributed.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise RuntimeError(
                f"checkpoint {ckpt_dir / tag} {change}, and DeepSpeed could not convert it to its universal "
                f"format to reshard it ({verdict[0]}). Resume it with the layout that wrote it.")
        return final

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The unsharded model weights on rank 0 (None elsewhere). A collective: call on every rank."""
        if self.parallel.zero_stage == 3 or self.parallel.tp > 1:
            # DeepSpeed gathers ZeRO-3 partitions and AutoTP shards layer by layer to rank 0; this is
            # the in-memory half of its save_16bit_model.
            return self.engine._consolidated_16bit_state_dict()
        if not self.topology.is_main:
            return None
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
