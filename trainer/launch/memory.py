"""Memory per GPU of a training layout, estimated from the architecture alone (no torch, no GPU).

The estimate is the peak of the most loaded rank (see :class:`Estimate` for how the parts combine):

    persistent: weights + optimizer state (+ reference model, + ZeRO-3's gathered working set)
    + max(activations + logits at the start of backward, gradients + one layer at its end)
      (gradients counted in both terms when they outlive a step's backward: accumulation over
      micro-batches, megatron's and ZeRO-2/3's gradient buffers)

Checked on CPU against torch's profiler (``tests/test_plan.py``): within 0.1 % of the measured peak
of fp32 training steps of transformers models; with activation recompute 1.8-2.9 % above it
(within 0.3 % with gradient accumulation).

Parameters (``ModelShape``): counted from the transformers config, matrix by matrix; the count equals
the model's own (``tests/test_plan.py`` builds each on the meta device). Per rank, tensor parallelism
splits the attention and MLP matrices (and the vocabulary under megatron, or an untied head under
AutoTP); norms and row-parallel biases stay whole. A pipeline stage holds ``L/pp`` layers; the first
also the embedding, the last the output layer (megatron keeps a second copy of a tied embedding there).

Bytes per parameter, Psi = parameters on the rank, N = data-parallel size (ZeRO, Rajbhandari et al.
2020, §3: weights + gradients + K·Psi optimizer state, K = 12 for mixed-precision Adam):

    deepspeed fp32: 4 + 4 + 8 (Adam moments; no master copy)
    deepspeed bf16: 2 + 2 + 12 (fp32 master + moments) + 4 (the fp32 gradient partition the ZeRO
                    optimizer steps on); ZeRO-1 divides the optimizer terms by N, ZeRO-2 also the
                    gradients, ZeRO-3 also the weights.
    megatron  bf16: 2 + 4 (fp32 main gradients: grad_reduce_in_fp32) + 12; the distributed optimizer
                    divides the 12 by N (Megatron-Bridge's 6 + 12/N). fp32: 4 + 4 + 8 (8/N).

Activations, per layer and token, in bytes (Korthikanti et al. 2022, "Reducing activation
recomputation in large transformer models", Table 2: ``s·b·h·(34 + 5·a·s/h)`` for a GPT layer with
16-bit activations, dropout and F = 4h, ``10 + 24/t`` of it under tensor parallelism ``t``), written
per term so that GQA, gated MLPs and flash attention follow (e = bytes per activation element, 2 for
bf16, g = KV heads, d = head dim, F = FFN width):

    megatron (what megatron-core keeps; dropout masks kept as in the paper):
      replicated (split only by sequence parallelism): 2 norm inputs 2·e·h, QKV and FC1 inputs 2·e·h,
                 2 dropout masks 2·h                                       -> (4e + 2)·h
      split by t: q e·a·d, k and v 2·e·g·d, out-projection input e·a·d, MLP e·(2F + F) gated (FC1's
                 two halves, its product) or e·(F + F) (act input, FC2 input); unfused attention adds
                 the softmax, its dropout mask and output, (2e + 1)·a·s (0 with flash attention).
    deepspeed (a transformers decoder layer with SDPA, counted from what autograd saves; see
    ``hf_layer_bytes``): RMSNorm keeps its fp32 input, normalised input and output twice per layer;
      attention e·(2·a·d + 2·g·d) + fp32 log-sum-exp; MLP 4·e·F gated, 2·e·F not.

With activation checkpointing (full recompute) a layer keeps only its input (e·h per token), and
backward re-materialises one layer at a time. Under 1F1B pipelining the first stage holds
``min(pp, M)`` micro-batches of its ``L/pp`` layers (interleaving: × 1 + (pp-1)/(pp·vpp)), the last
stage one; both are evaluated and the larger reported.

Logits: the loss takes log-probs in fp32 (``trainer.losses.token_logps``), so one micro-batch holds
its logits (e bytes), the fp32 log-softmax kept for backward, and at the start of backward that
tensor's gradient: ``b·s·(V/t)·(e + 4 + 4)`` (the full V under AutoTP, which gathers the logits).

Reference model (DPO/RPO): ``online`` keeps a forward-only copy sharded like the policy's weights
(no gradients, no optimizer; its no-grad activations are transient); ``cached`` keeps nothing on the
GPU (a table of 4 numbers per pair on the host).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that memory depends on."""

    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    gated: bool  # SwiGLU-style gate and up projections (Llama) vs one up projection (Nemotron's relu2)
    layer_norm: bool  # LayerNorm with a bias (Nemotron) vs RMSNorm
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_hf_config(cls, c) -> "ModelShape":
        kind = c.model_type
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        attention_bias = bool(getattr(c, "attention_bias", False))
        return cls(family=kind, layers=c.num_hidden_layers, hidden=c.hidden_size, heads=heads,
                   kv_heads=getattr(c, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   ffn=c.intermediate_size, vocab=c.vocab_size, tied=bool(c.tie_word_embeddings),
                   gated=getattr(c, "hidden_act", "silu") not in ("relu2", "gelu", "gelu_new", "relu"),
                   layer_norm=kind == "nemotron", qkv_bias=kind == "qwen2" or attention_bias,
                   out_bias=attention_bias, mlp_bias=bool(getattr(c, "mlp_bias", False)))

    # -- parameter counts -------------------------------------------------------------------------
    def norm_params(self) -> int:
        return self.hidden * (2 if self.layer_norm else 1)

    def layer_split_params(self) -> int:
        """Per layer, the parameters tensor parallelism splits: q/k/v (+ their bias), the output
        projection, FC1 (+ bias) and FC2."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        up = (2 if self.gated else 1) * self.ffn
        return attn + h * up + self.ffn * h + (up if self.mlp_bias else 0)

    def layer_whole_params(self) -> int:
        """Per layer, the parameters every tensor-parallel rank holds whole: two norms and the
        row-parallel biases (added after the all-reduce)."""
        return 2 * self.norm_params() + (self.hidden if self.out_bias else 0) + (self.hidden if self.mlp_bias else 0)

    def layer_params(self) -> int:
        return self.layer_split_params() + self.layer_whole_params()

    def total_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params() + embeddings + self.norm_params()


def padded_vocab(vocab: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of ``tp``, so each tensor rank holds V/tp rows."""
    return math.ceil(vocab / tp) * tp


@dataclass(frozen=True)
class Layout:
    """One rank's view of a layout and its micro-batch (``rows``: sequences per micro-batch, 2 per
    preference pair; ``micro_batches``: per optimizer step and data-parallel rank)."""

    strategy: str = "deepspeed"
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    dp: int = 1
    zero_stage: int = 0
    distributed_optimizer: bool = True
    precision: str = "bf16"
    offload_optimizer: bool = False
    recompute: bool = False
    sequence_parallel: bool = False
    flash_attention: bool = True
    rows: int = 1
    seq_len: int = 4096
    micro_batches: int = 1
    reference: str = "none"  # none | online | cached
    trains: bool = True  # false: forward only (an annotate stage scoring with a reward model)
    lm_head: bool = True  # false: a reward model, whose head gives a few scores, not V logits


@dataclass
class Estimate:
    """Bytes on the most loaded GPU, by component (``cpu_optimizer``: host memory under offload).

    ``total`` is the peak: what persists (weights, optimizer state, reference, ZeRO-3's working set)
    plus the larger of the two moments of a step. At the start of backward all activations and the
    logits are alive; later the gradients grow while activations are freed, ending with every
    gradient and one layer's tensors (``backward_working``; under recompute also the kept layer
    inputs). When gradients live across the step — accumulated over micro-batches, kept in megatron's
    or ZeRO-2/3's persistent buffers — they add to both moments instead (``grads_dynamic`` false)."""

    stage: str
    params: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    reference: float = 0.0
    zero3_working: float = 0.0
    cpu_optimizer: float = 0.0
    backward_working: float = 0.0
    grads_dynamic: bool = False
    notes: list[str] = field(default_factory=list)

    COMPONENTS = ("weights", "gradients", "optimizer", "activations", "logits", "reference", "zero3_working")

    @property
    def total(self) -> float:
        persistent = self.weights + self.optimizer + self.reference + self.zero3_working
        if self.grads_dynamic:
            return persistent + max(self.activations + self.logits, self.gradients + self.backward_working)
        return persistent + self.gradients + max(self.activations + self.logits, self.backward_working)


def element_bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4


def layer_rank_params(shape: ModelShape, layout: Layout) -> float:
    """Parameters of one layer on one tensor-parallel rank."""
    split = shape.layer_split_params()
    if shape.family == "phi3" and layout.strategy == "deepspeed":
        # AutoTP splits only Phi3's MLP (trainer.parallel.deepspeed._PHI3_PLAN).
        mlp = shape.hidden * (3 if shape.gated else 2) * shape.ffn
        return split - mlp + mlp / layout.tp + shape.layer_whole_params()
    return split / layout.tp + shape.layer_whole_params()


def rank_params(shape: ModelShape, layout: Layout, stage: str) -> int:
    """Parameters one rank of pipeline stage ``stage`` (first | last | only) holds before ZeRO-3."""
    t = layout.tp
    layers = shape.layers // layout.pp
    per_layer = layer_rank_params(shape, layout)
    count = layers * per_layer
    h = shape.hidden
    if layout.strategy == "megatron":
        table = padded_vocab(shape.vocab, t) * h / t  # VocabParallelEmbedding / output layer
        if stage in ("first", "only"):
            count += table
        if stage in ("last", "only"):
            count += shape.norm_params()
            if not (shape.tied and stage == "only"):
                count += table  # the output layer, or the tied embedding's copy on the last stage
    else:
        # AutoTP keeps the embedding whole; an untied head is column-parallel, a tied one whole.
        count += shape.vocab * h + shape.norm_params() + (0 if shape.tied else shape.vocab * h / t)
    return int(count)


def state_bytes(params: int, layout: Layout) -> tuple[float, float, float, float]:
    """(weights, gradients, optimizer, host optimizer) bytes for ``params`` (the module docstring's
    table)."""
    n, z, bf16 = layout.dp, layout.zero_stage, layout.precision == "bf16"
    if layout.strategy == "megatron":
        opt = 12 if bf16 else 8
        return (params * (2 if bf16 else 4), params * 4.0,
                params * opt / (n if layout.distributed_optimizer else 1), 0.0)
    w, g, opt = (2, 2, 16) if bf16 else (4, 4, 8)
    weights = params * w / (n if z >= 3 else 1)
    grads = params * g / (n if z >= 2 else 1)
    optimizer = params * opt / (n if z >= 1 else 1)
    if layout.offload_optimizer:
        return weights, grads, 0.0, optimizer
    return weights, grads, optimizer, 0.0


def norm_bytes(shape: ModelShape, e: int) -> float:
    """Bytes per token a transformers norm saves: RMSNorm its input upcast to fp32 (4h), the
    normalised input in the model dtype (for the weight's gradient), its output (the next
    projection's input) and an fp32 rsqrt; LayerNorm its input, output, and fp32 mean and rstd."""
    return 2 * e * shape.hidden + 8 if shape.layer_norm else (4 + 2 * e) * shape.hidden + 4


def hf_layer_bytes(shape: ModelShape, e: int, t: int = 1) -> float:
    """Bytes per token one transformers decoder layer (SDPA) keeps for backward, split by AutoTP ``t``.

    Counted from the tensors autograd saves (``tests/test_plan.py`` hooks them on real models):
    two norms (:func:`norm_bytes`); SDPA's q, k, v, its output (which Llama-style attention hands the
    output projection as a view) and an fp32 log-sum-exp per head; the gated MLP's gate and up
    outputs, activation and product (4·e·F), an ungated MLP's activation output and product (2·e·F).
    Family differences, as measured: Nemotron copies the attention output (``.contiguous()``) before
    its output projection (+ e·q); Phi3 slices q, k, v as views of its fused qkv output, so the whole
    output is kept (+ e·(q + kv)), and one more h-wide copy (+ e·h). AutoTP splits attention and MLP
    terms by ``t``, but not the norms (nor Phi3's attention, which it keeps whole)."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = 2 * norm_bytes(shape, e)
    attn = e * (2 * q + 2 * kv) + 4 * shape.heads
    mlp = e * (4 if shape.gated else 2) * shape.ffn
    if shape.family == "nemotron":
        attn += e * q
    if shape.family == "phi3":
        return norms + attn + e * (q + kv + h) + mlp / t
    return norms + (attn + mlp) / t


def megatron_layer_bytes(shape: ModelShape, e: int, t: int, sp: bool, flash: bool, seq: int) -> float:
    """Bytes per token one megatron-core layer keeps (the module docstring's term list)."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    whole = (4 * e + 2) * h
    split = e * (2 * q + 2 * kv) + e * (3 if shape.gated else 2) * shape.ffn
    if not flash:
        split += (2 * e + 1) * shape.heads * seq
    return (whole / t if sp else whole) + split / t


def layer_activation_bytes(shape: ModelShape, layout: Layout) -> tuple[float, float]:
    """(bytes per token one layer keeps for backward, bytes per token it keeps under recompute)."""
    e, t = element_bytes(layout.precision), layout.tp
    if layout.strategy == "megatron":
        per_layer = megatron_layer_bytes(shape, e, t, layout.sequence_parallel, layout.flash_attention,
                                         layout.seq_len)
        return per_layer, e * shape.hidden / (t if layout.sequence_parallel else 1)
    return hf_layer_bytes(shape, e, t), e * shape.hidden


def activation_bytes(shape: ModelShape, layout: Layout, stage: str) -> tuple[float, float]:
    """(activations of one rank of pipeline stage ``stage`` at the start of backward, the one layer
    backward re-materialises or works on at a time)."""
    e = element_bytes(layout.precision)
    tokens = layout.rows * layout.seq_len
    layers = shape.layers // layout.pp
    per_layer, kept = layer_activation_bytes(shape, layout)
    in_flight = 1
    if layout.pp > 1 and stage == "first":
        in_flight = min(layout.pp, layout.micro_batches)
        if layout.vpp > 1:
            in_flight *= 1 + (layout.pp - 1) / (layout.pp * layout.vpp)
    if not layout.trains:
        held = per_layer  # no graph is kept: one layer's tensors at a time
    elif layout.recompute:
        held = layers * kept * in_flight  # the layer inputs; backward recomputes one layer at a time
    else:
        held = layers * per_layer * in_flight
    if stage in ("last", "only"):
        held += norm_bytes(shape, e)  # the final norm
    working = per_layer + (layers * kept if layout.recompute else 0.0)
    return held * tokens, working * tokens


def logits_bytes(shape: ModelShape, layout: Layout) -> float:
    """One micro-batch's logits, fp32 log-softmax and its gradient (module docstring)."""
    e = element_bytes(layout.precision)
    v = padded_vocab(shape.vocab, layout.tp) / layout.tp if layout.strategy == "megatron" else shape.vocab
    return layout.rows * layout.seq_len * v * (e + 4 + 4)


def estimate_stage(shape: ModelShape, layout: Layout, stage: str) -> Estimate:
    params = rank_params(shape, layout, stage)
    weights, grads, optimizer, host = state_bytes(params, layout)
    if not layout.trains:
        grads = optimizer = host = 0.0
    activations, working = activation_bytes(shape, layout, stage)
    e = element_bytes(layout.precision)
    est = Estimate(stage=stage, params=params, weights=weights, gradients=grads, optimizer=optimizer,
                   cpu_optimizer=host, activations=activations, backward_working=working,
                   grads_dynamic=(layout.strategy == "deepspeed" and layout.zero_stage <= 1
                                  and layout.micro_batches == 1),
                   logits=logits_bytes(shape, layout) if stage in ("last", "only") and layout.lm_head else 0.0)
    if layout.reference == "online":
        est.reference = params * e / (layout.dp if layout.zero_stage >= 3 else 1)
    if layout.strategy == "deepspeed" and layout.zero_stage >= 3:
        # Two whole layers gathered at once (the current one and the prefetched next) and the
        # largest single module, the embedding or head, when it runs; under a parameter count
        # capped by DeepSpeed's stage3_max_live_parameters (1e9).
        largest = max(2 * layer_rank_params(shape, layout), shape.vocab * shape.hidden)
        est.zero3_working = min(largest, 1e9) * e
    return est


def estimate(shape: ModelShape, layout: Layout) -> Estimate:
    """The most loaded rank: the first or the last pipeline stage, or the only one."""
    notes = []
    if layout.strategy == "megatron" and shape.vocab % layout.tp:
        notes.append(f"vocabulary {shape.vocab} is padded to {padded_vocab(shape.vocab, layout.tp)} "
                     f"(a multiple of tp={layout.tp}) in this estimate")
    if layout.pp == 1:
        best = estimate_stage(shape, layout, "only")
    else:
        best = max((estimate_stage(shape, layout, s) for s in ("first", "last")), key=lambda x: x.total)
    best.notes.extend(notes)
    return best
