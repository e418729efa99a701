"""Strategy ``megatron``: a megatron-core GPTModel, tensor x pipeline x data parallel.

The stage's Hugging Face CausalLM is converted to this rank's GPTModel chunk(s) (TP shards of the
layers of this pipeline stage; :mod:`trainer.models.megatron_convert`), wrapped in megatron's DDP and
optimizer (the distributed optimizer when ``parallel.distributed_optimizer``), and driven by megatron's
pipeline schedules (1F1B; interleaved when ``parallel.virtual_pp > 1``). Groups come from the Topology,
which already initialised megatron-core's ``parallel_state``.

Per-token log-probs are ``-vocab_parallel_cross_entropy(logits, labels)`` on the vocabulary-parallel
logits, so no rank ever gathers full-vocabulary logits; stage losses receive them unchanged.

Gradient scale: for a ``(loss, dict)`` loss function the schedules divide each micro-batch loss by the
number of micro-batches M, and megatron DDP averages gradients over the data-parallel group. Stage
losses are already shares of the GLOBAL-batch loss, so the loss handed to the schedule is multiplied by
``M * dp`` to undo both (exactly as the deepspeed strategy does): the applied gradient is the gradient
of the sum of shares over all micro-batches and data-parallel ranks.

Attention: micro-batches are right-padded and attention is causal without a padding mask. A real
token only attends to earlier positions, which are all real, so its logits are exactly those of the
unpadded sequence; padding positions carry loss_mask 0. The same argument lets :meth:`train_step` pad
every micro-batch of a step to one length (pipeline p2p needs one activation shape per step).
"""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from omegaconf import DictConfig

from trainer.models import megatron_convert as convert
from trainer.parallel import megatron_checkpoint as checkpoint
from trainer.parallel.schedule import lr_multiplier
from trainer.parallel.strategy import LossFn, at_stop, poison_nonfinite
from trainer.parallel.topology import Topology

# Seed of megatron's model-parallel RNG tracker. Dropout is off in every converted model, so no random
# stream is consumed; the tracker must exist because megatron's attention forks it.
_TRACKER_SEED = 1234


def _pad(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """Right-pad every [B, T] entry to ``length`` with zeros (loss_mask 0: padding never counts)."""
    t = batch["input_ids"].shape[1]
    if t == length:
        return batch
    out = {}
    for key, value in batch.items():
        if value.dim() >= 2 and value.shape[1] == t:
            value = torch.nn.functional.pad(value, (0, 0) * (value.dim() - 2) + (0, length - t))
        out[key] = value
    return out


class _RewardHead(torch.nn.Linear):
    """A reward model's ``Linear(hidden, A)`` in the GPTModel's output-layer slot: called like megatron's
    output layer (``hidden [S, B, H] -> (out, bias)``), it maps every position's final hidden state to
    A scores. Replicated on every tensor-parallel rank (A is a handful of attributes): its input is
    identical there, so are its gradients, and megatron counts unsharded parameters once in the norm."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__(head.in_features, head.out_features, bias=head.bias is not None, dtype=head.weight.dtype)
        self.load_state_dict(head.state_dict())

    def forward(self, hidden: torch.Tensor, weight=None, runtime_gather_output=None):
        return super().forward(hidden), None


class MegatronStrategy:
    """Owns the GPTModel chunks, megatron DDP and optimizer of one model for one stage."""

    # dist_checkpointing loads a checkpoint written in any TP/PP/DP layout (CheckpointManager may
    # skip its same-layout check for strategies that say so).
    reshardable_checkpoints = True

    def __init__(self, parallel: DictConfig, topology: Topology):
        if parallel.cp != 1:
            raise NotImplementedError("parallel.cp: context parallelism is not wired into the megatron strategy yet")
        if parallel.sequence_parallel and not convert.HAVE_TE:
            raise NotImplementedError("parallel.sequence_parallel: needs Transformer Engine (its norms)")
        if parallel.virtual_pp > 1 and parallel.pp == 2 and topology.device.type == "cpu":
            # Measured on gloo: pp=2 x vpp=2 drifts from 1F1B from the third micro-batch on, while
            # pp=4 x vpp=2 matches it exactly. Likely cause: with two stages the previous and next
            # stage are one peer, and same-shaped activation and gradient transfers to it get paired
            # in the wrong order. Untested on NCCL, so refused only on CPU.
            raise NotImplementedError("parallel.virtual_pp > 1 with parallel.pp=2 is wrong on gloo (CPU); "
                                      "use parallel.pp >= 4 or parallel.virtual_pp=1")
        if parallel.offload_optimizer:
            raise NotImplementedError("parallel.offload_optimizer: not supported by parallel.strategy=megatron")
        if parallel.precision not in ("fp32", "bf16"):
            raise ValueError(f"parallel.precision: {parallel.precision!r} (fp32 | bf16)")
        self.parallel = parallel
        self.topology = topology
        self.vpp = parallel.virtual_pp
        self.step = 0  # optimizer steps taken: the LR schedule's clock, checkpointed

    # ---- setup -------------------------------------------------------------------------------------
    def model_init_context(self, micro_batch_size: int, grad_accum: int, pretrained: bool):
        """The HF model is built whole on CPU and converted/sharded in :meth:`setup`."""
        return contextlib.nullcontext()

    def setup_inference(self, model: torch.nn.Module, micro_batch_size: int) -> None:
        """A forward-only model (a reference model): the chunks of :meth:`setup`, sharded the same way,
        without megatron DDP or an optimizer; :meth:`token_logps` and :meth:`full_state_dict` work on it."""
        self.model = self._build_chunks(model)
        self.forward_backward = get_forward_backward_func(
            pp_size=self.topology.pp, vp_size=self.vpp if self.vpp > 1 else None)
        self.eval()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id):
        """Greedy continuation of left-padded prompts, [B, prompt + new], as transformers' ``generate``
        returns it (prompt padding kept, pad after a row's first stop token: any of ``eos_token_id``,
        one id or a list; stops when every row has ended).

        No KV cache: every new token re-runs the whole prefix. The prompts are re-laid RIGHT-padded,
        so plain causal attention is exact for every real token (module docstring), and row b's next
        token is read at its own last position. The argmax is taken over the vocabulary-parallel
        logits without gathering them: each tensor rank's best (value, index), then the best of those.
        A collective over the tensor and pipeline groups (each data-parallel rank decodes its own rows)."""
        b, prompt = input_ids.shape
        lengths = attention_mask.sum(1).long()
        seq = torch.full((b, prompt + max_new_tokens), pad_token_id, dtype=torch.long, device=input_ids.device)
        for row in range(b):
            seq[row, :lengths[row]] = input_ids[row, attention_mask[row].bool()]
        rows = torch.arange(b, device=input_ids.device)
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        new = []
        for step in range(max_new_tokens):
            ends = lengths + step  # each row's length so far
            token = self._forward({"input_ids": seq[:, :int(ends.max())]},
                                  lambda logits, _: self._vocab_parallel_argmax(logits[rows, ends - 1]),
                                  (b,), torch.long)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            seq[rows, ends] = token
            new.append(token)
            done |= at_stop(token, eos_token_id)
            if bool(done.all()):
                break
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids

    def _vocab_parallel_argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Global argmax [B] of vocabulary-parallel logits [B, V/tp] (the lowest index among equal
        maxima, as torch.argmax over the full vocabulary picks)."""
        local = logits.float().argmax(-1)
        value = logits.float().gather(-1, local[:, None])[:, 0]
        index = local + self.topology.tp_rank * logits.shape[-1]
        if self.topology.tp == 1:
            return index
        group = parallel_state.get_tensor_model_parallel_group()
        values = [torch.empty_like(value) for _ in range(self.topology.tp)]
        indices = [torch.empty_like(index) for _ in range(self.topology.tp)]
        dist.all_gather(values, value, group=group)
        dist.all_gather(indices, index, group=group)
        best = torch.stack(values).argmax(0)  # the first (lowest-vocabulary) rank holding the maximum
        return torch.stack(indices).gather(0, best[None])[0]

    def outputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token log-probs [B, T] for a CausalLM, attribute scores [B, A] for a reward model."""
        if not self.reward:
            return self.token_logps(batch)
        return self._forward(batch, self._scores, (batch["input_ids"].shape[0], len(self._hf.attributes)),
                             torch.float32)

    @staticmethod
    def _scores(head_out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A reward model's [B, A] scores: the head's output at each row's last real token."""
        rows = torch.arange(head_out.shape[0], device=head_out.device)
        return head_out[rows, batch["last_index"]].float()

    def _build_chunks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """Convert the HF ``model`` into this rank's GPTModel chunk(s) (``self.chunks``), leave the HF
        object as a meta-device shell, and return the chunks as the schedules run them (Float16Module
        for bf16)."""
        dtype = torch.bfloat16 if self.parallel.precision == "bf16" else torch.float32
        # A reward model (trainer.models.reward.RewardModel) is its CausalLM backbone with the output
        # layer replaced by its attribute head; the backbone's LM head is never run.
        self.reward = getattr(model, "is_reward_model", False)
        hf = model.backbone if self.reward else model
        self.hf_config = hf.config
        self.config = convert.transformer_config(
            self.hf_config, self.topology.tp, self.topology.pp, self.vpp, dtype,
            use_cpu_init=self.topology.device.type == "cpu", sequence_parallel=self.parallel.sequence_parallel,
            recompute=self.parallel.activation_checkpointing)
        tensor_parallel.model_parallel_cuda_manual_seed(_TRACKER_SEED)
        if self.vpp > 1 and parallel_state.get_virtual_pipeline_model_parallel_world_size() != self.vpp:
            # What initialize_model_parallel(virtual_pipeline_model_parallel_size=...) records; the
            # Topology does not pass it (megatron's embedding-group and stage getters read it).
            parallel_state.set_virtual_pipeline_model_parallel_world_size(self.vpp)
            parallel_state.set_virtual_pipeline_model_parallel_rank(0)
        hf_state = hf.state_dict()
        self.chunks = []  # the bare GPTModel chunks (names, sharded state dicts, export)
        for vp in range(self.vpp):
            vp_stage = vp if self.vpp > 1 else None
            # Explicit rather than parallel_state.is_pipeline_*_stage, which ignore vp_stage whenever
            # parallel_state was initialised without a virtual size.
            last = self.topology.pp_rank == self.topology.pp - 1 and vp == self.vpp - 1
            chunk = convert.build_gpt_model(
                self.hf_config, self.config, vp_stage=vp_stage, pre_process=self.topology.pp_rank == 0 and vp == 0,
                post_process=last, tie_output=False if self.reward else None)
            convert.load_hf_weights(chunk, hf_state, self.hf_config, self.topology.tp_rank, self.topology.tp)
            if self.reward and last:
                chunk.output_layer = _RewardHead(model.head)
            self.chunks.append(chunk.to(device=self.topology.device, dtype=dtype))
        del hf_state
        # Frozen and never run, but part of the exported backbone when untied.
        untied = self.reward and not self.hf_config.tie_word_embeddings and self.topology.is_main
        self._lm_head = hf.get_output_embeddings().weight.detach().clone() if untied else None
        # Keep only the HF shell (config, save_pretrained); its weights live in the chunks now.
        self._hf = model.to("meta")

        if dtype != torch.float32:
            from megatron.core.transformer.module import Float16Module

            wrapped = [Float16Module(self.config, c) for c in self.chunks]
        else:
            wrapped = self.chunks
        return wrapped

    def setup(self, model: torch.nn.Module, optim: DictConfig, micro_batch_size: int, grad_accum: int,
              total_steps: int) -> None:
        if self.vpp > 1 and grad_accum % self.topology.pp:
            raise ValueError(f"parallel.virtual_pp > 1 needs the micro-batches per step ({grad_accum}) to be a "
                             f"multiple of parallel.pp={self.topology.pp}")
        wrapped = self._build_chunks(model)
        dtype = torch.bfloat16 if self.parallel.precision == "bf16" else torch.float32
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
            use_distributed_optimizer=self.parallel.distributed_optimizer, check_for_nan_in_grad=False)
        self.model = [DistributedDataParallel(self.config, ddp_config, m, disable_bucketing=i > 0)
                      for i, m in enumerate(wrapped)]
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=optim.lr, weight_decay=optim.weight_decay, adam_beta1=optim.betas[0],
            adam_beta2=optim.betas[1], adam_eps=optim.eps, clip_grad=optim.grad_clip, bf16=dtype == torch.bfloat16,
            params_dtype=dtype, use_distributed_optimizer=self.parallel.distributed_optimizer), self.model)
        self.config.no_sync_func = [m.no_sync for m in self.model]
        if len(self.model) == 1:
            self.config.no_sync_func = self.config.no_sync_func[0]
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.base_lr, self.weight_decay = optim.lr, optim.weight_decay
        self.schedule = functools.partial(lr_multiplier, total_steps=total_steps, warmup_steps=optim.warmup_steps,
                                          schedule=optim.schedule, min_lr_ratio=optim.min_lr_ratio)
        self.forward_backward = get_forward_backward_func(
            pp_size=self.topology.pp, vp_size=self.vpp if self.vpp > 1 else None)

    @property
    def module(self) -> torch.nn.Module:
        """The Hugging Face model shell (config and ``save_pretrained``; weights on the meta device)."""
        return self._hf

    def train(self) -> None:
        for m in self.model:
            m.train()

    def eval(self) -> None:
        for m in self.model:
            m.eval()

    # ---- forward / backward ------------------------------------------------------------------------
    def _run(self, batches: list[dict[str, torch.Tensor]], loss_func: Callable, forward_only: bool) -> list:
        """Megatron's schedule over ``batches``; returns what ``loss_func`` stored on the last stage."""
        if any("branch" in b for b in batches):
            raise NotImplementedError("stage.prefix_sharing: prompt-shared batches need a 4D attention mask, which "
                                      "parallel.strategy=megatron does not build; set stage.prefix_sharing=false")
        if any("seq_id" in b or "position_ids" in b for b in batches):
            # Plain causal attention would let a packed sequence attend to the ones before it.
            raise NotImplementedError("stage.packing: packed batches (position_ids / seq_id) need a "
                                      "per-sequence attention mask, which parallel.strategy=megatron does not build; "
                                      "set stage.packing=false")
        length = max(b["input_ids"].shape[1] for b in batches)
        batches = [_pad(b, length) for b in batches]

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            ids = batch["input_ids"]
            positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
            # attention_mask=None: causal attention (see the module docstring on right padding).
            return model(ids, positions, None), functools.partial(loss_func, batch)

        iterators = [iter(batches) for _ in self.model]
        return self.forward_backward(
            forward_step_func=forward_step, data_iterator=iterators if self.vpp > 1 else iterators[0],
            model=self.model if self.vpp > 1 else self.model[0], num_microbatches=len(batches),
            seq_length=length, micro_batch_size=batches[0]["input_ids"].shape[0], forward_only=forward_only,
            collect_non_loss_data=forward_only)

    @staticmethod
    def _logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(labels) per position from this rank's vocabulary slice of the logits, [B, T] float32."""
        return -tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)

    def from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """Broadcast a tensor the last pipeline stage holds to the whole pipeline group (through the
        device: NCCL cannot send CPU tensors); returned where it came from."""
        if self.topology.pp == 1:
            return tensor
        out = tensor.to(self.topology.device).contiguous()
        dist.broadcast(out, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        return out.to(tensor.device)

    def train_step(self, batches: list[dict[str, torch.Tensor]], loss_fn: LossFn,
                   on_micro_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches (see the module docstring for the scale).

        Returns the local sum of the loss shares (float64, identical on every rank of a pipeline and
        tensor group), the pre-clip global grad norm and the LR used."""
        if on_micro_batch is not None:
            raise NotImplementedError("stage.neftune_alpha: NEFTune hooks the HF embedding, which "
                                      "parallel.strategy=megatron does not run")
        scale = len(batches) * self.topology.dp

        def loss_func(batch, output):
            outputs = self._scores(output, batch) if self.reward else self._logps(output, batch["labels"])
            share = loss_fn(outputs, batch)
            # A non-finite share poisons every gradient (times NaN), so the grad-norm check below
            # catches a bad loss too, on every rank, with no extra collective.
            return share * poison_nonfinite(share, scale), {"share": share.detach()}

        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        stored = self._run(batches, loss_func, forward_only=False)
        total = torch.zeros((), dtype=torch.float64, device=self.topology.device)
        for item in stored:  # only the last stage stores anything
            total += item["share"].double()
        total = self.from_last_stage(total).cpu()

        lr = self.base_lr * self.schedule(self.step)
        for group in self.optimizer.param_groups:
            # What megatron's OptimizerParamScheduler would set; its groups carry wd_mult 0 for
            # biases and 1-D parameters (the deepspeed strategy's grouping) and lr_mult 1.
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)
        # megatron's fp32 optimizers apply non-finite gradients; look at the global norm first (the
        # model-parallel and, for the distributed optimizer, data-parallel reduced one) and skip the
        # update when it is not finite. Identical on every rank, so every rank skips together.
        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            ok, grad_norm, _ = self.optimizer.step()
            skipped = not ok
        self.step += 1  # the LR schedule advances over a skipped step too: it counts steps, not updates
        return {"loss": total, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "lr": lr, "skipped": skipped}

    @torch.no_grad()
    def _forward(self, batch: dict[str, torch.Tensor], read: Callable, shape: tuple,
                 dtype: torch.dtype) -> torch.Tensor:
        """Forward only: ``read(output, batch)`` on the last pipeline stage (output: this rank's
        vocabulary slice of the logits, or the reward head's scores), a ``shape`` tensor broadcast to
        the whole pipeline group."""
        def loss_func(b, output, non_loss_data=True):
            return read(output, b)

        # The interleaved schedule needs at least pp micro-batches; repeat the batch and keep the first.
        copies = self.topology.pp if self.vpp > 1 else 1
        stored = self._run([batch] * copies, loss_func, forward_only=True)
        out = stored[0] if stored else torch.empty(shape, dtype=dtype, device=self.topology.device)
        return self.from_last_stage(out.to(dtype))

    def token_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward only: log p(labels | context), [B, T], on every rank (not differentiable)."""
        return self._forward(batch, lambda logits, b: self._logps(logits, b["labels"]), batch["input_ids"].shape,
                             torch.float32)

    # ---- checkpoints (trainer.parallel.megatron_checkpoint) -----------------------------------------
    def save(self, ckpt_dir: Path, tag: str, client_state: dict) -> None:
        """megatron dist_checkpointing under ``ckpt_dir/tag/megatron``: loadable in another TP/PP layout."""
        checkpoint.save(Path(ckpt_dir) / tag / "megatron", self.chunks, self.optimizer, self.step, client_state,
                        self.topology.is_main)

    def load(self, ckpt_dir: Path, tag: str, saved: dict | None = None) -> dict:
        """dist_checkpointing reshards to this layout whatever ``saved`` (the writer's layout) was."""
        self.step, client_state = checkpoint.load(Path(ckpt_dir) / tag / "megatron", self.chunks, self.optimizer)
        return client_state

    # ---- export ------------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """HF-named full weights on rank 0, None elsewhere: TP shards gathered within each tensor group,
        then each pipeline stage's tensors sent to rank 0. A collective: call on every rank."""
        if self.topology.dp_rank != 0:
            return None
        tp_group = parallel_state.get_tensor_model_parallel_group()
        stage: dict[str, torch.Tensor] = {}
        prefix = "backbone." if self.reward else ""
        for chunk in self.chunks:
            for name, (layer, param) in convert.local_params(chunk).items():
                if self.reward and name.startswith("output_layer."):  # the head, whole on every rank
                    stage["head." + name.split(".", 1)[1]] = param.detach().float().cpu()
                    continue
                if name == "output_layer.weight" and self.hf_config.tie_word_embeddings:
                    continue  # the copy of the embedding the last stage keeps
                local = param.detach().float().contiguous()
                shards = [torch.empty_like(local) for _ in range(self.topology.tp)]
                dist.all_gather(shards, local, group=tp_group)
                if self.topology.tp_rank == 0:
                    names = [prefix + n for n in convert.hf_names(name, layer, self.hf_config)]
                    tensors = convert.from_megatron_shards(name, [s.cpu() for s in shards], self.hf_config)
                    stage.update(zip(names, tensors))
        if self.topology.tp_rank != 0:
            return None
        stages = [None] * self.topology.pp if self.topology.is_main else None
        if self.topology.pp > 1:
            dist.gather_object(stage, stages, dst=0, group=parallel_state.get_pipeline_model_parallel_group())
        else:
            stages = [stage]
        if not self.topology.is_main:
            return None
        full = {k: v for s in stages for k, v in s.items()}
        if self._lm_head is not None:
            full["backbone.lm_head.weight"] = self._lm_head
        dtype = torch.bfloat16 if self.parallel.precision == "bf16" else torch.float32
        return {k: v.to(dtype) for k, v in sorted(full.items())}
