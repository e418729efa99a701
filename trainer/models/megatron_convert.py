"""Hugging Face CausalLM <-> megatron-core GPTModel: the config translation and the weight mapping.

The megatron adapter of the model layer: pure functions over configs and tensors plus the builder of
one rank's GPTModel chunk. Process groups are passed in by the caller (the megatron strategy).

Supported families: Llama, Qwen2, Mistral (RoPE, GQA, SwiGLU, RMSNorm, optional q/k/v bias, tied or
untied embeddings) and Nemotron (LayerNorm1P, i.e. LayerNorm with ``1 + weight`` and a bias = megatron's
``layernorm_zero_centered_gamma``; squared-ReLU MLP without a gate; partial RoPE = ``rotary_percent``;
optional biases on every linear). Anything else is refused with the config field that is not supported.

Weight layout (megatron-core 0.16, local or Transformer Engine layer spec):

- ``self_attention.linear_qkv.weight`` fuses q, k and v *per query group*: for each of the G key/value
  heads, its ``heads/G`` query heads, then its key head, then its value head, each ``head_dim`` rows.
  Tensor parallelism splits that tensor along dim 0 into ``tp`` contiguous blocks of ``G/tp`` groups.
- ``mlp.linear_fc1.weight`` fuses gate and up *per rank*: rank r holds ``[gate_r; up_r]`` where gate_r
  and up_r are the r-th row blocks of HF's gate_proj and up_proj. Nemotron's (ungated) fc1 is up_proj.
- Column-parallel weights (qkv, fc1, embedding, output layer) and their biases split along dim 0,
  row-parallel ones (linear_proj, linear_fc2) along dim 1; their biases and the norms are replicated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "qwen2", "mistral", "nemotron")

try:  # Transformer Engine's fused layer spec when it is installed (GPU builds), megatron's own otherwise.
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TE = False


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise NotImplementedError(f"model.config.rope_parameters: rope_type {rope_type!r} (RoPE scaling) is not "
                                  "mapped to megatron yet; only the default RoPE is")
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def check_supported(hf_config) -> None:
    """Raise naming the config field when the model cannot be represented exactly as a GPTModel."""
    kind = hf_config.model_type
    if kind not in SUPPORTED:
        raise NotImplementedError(f"model.arch: {kind!r} has no megatron mapping (supported: {', '.join(SUPPORTED)})")
    if not _gated(hf_config):
        if hf_config.hidden_act != "relu2":
            raise NotImplementedError(f"model.config.hidden_act: {hf_config.hidden_act!r}; the Nemotron mapping "
                                      "assumes squared ReLU (relu2)")
        if bool(hf_config.attention_bias) != bool(hf_config.mlp_bias):
            raise NotImplementedError(f"model.config.mlp_bias: {hf_config.mlp_bias} with model.config.attention_bias: "
                                      f"{hf_config.attention_bias}; megatron's add_bias_linear biases q/k/v, o, fc1 "
                                      "and fc2 together, so both must be equal")
    elif hf_config.hidden_act != "silu":
        raise NotImplementedError(f"model.config.hidden_act: {hf_config.hidden_act!r}; the mapping assumes "
                                  "SwiGLU (silu)")
    elif getattr(hf_config, "mlp_bias", False):
        raise NotImplementedError("model.config.mlp_bias: MLP biases are not mapped")
    if kind == "llama" and getattr(hf_config, "attention_bias", False):
        raise NotImplementedError("model.config.attention_bias: Llama's o_proj bias is not mapped")
    if getattr(hf_config, "sliding_window", None) is not None and getattr(hf_config, "use_sliding_window", True):
        raise NotImplementedError("model.config.sliding_window: sliding-window attention is not mapped; set it to null "
                                  "(exact for sequences no longer than the window)")
    _rope_theta(hf_config)


def head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def qkv_bias(hf_config) -> bool:
    return hf_config.model_type == "qwen2" or (hf_config.model_type == "nemotron" and bool(hf_config.attention_bias))


def _gated(hf_config) -> bool:
    """SwiGLU (gate_proj, up_proj), or Nemotron's ungated up_proj."""
    return hf_config.model_type != "nemotron"


def rotary_percent(hf_config) -> float:
    """The leading fraction of each head that RoPE rotates. HF (``partial_rotary_factor``) and megatron
    (``rotary_percent``) both rotate dims ``[0, int(head_dim * f))`` of every q/k head and pass the rest
    through, with ``inv_freq = theta^(-2i / rot_dim)`` and non-interleaved halves (``rotate_half``)."""
    if hf_config.model_type != "nemotron":
        return 1.0  # Llama/Qwen2/Mistral's HF RoPE ignores partial_rotary_factor
    params = getattr(hf_config, "rope_parameters", None) or {}
    return float(params.get("partial_rotary_factor", 1.0))


def _family_fields(hf_config) -> dict:
    """The ``TransformerConfig`` fields in which the families differ."""
    if _gated(hf_config):
        return {"normalization": "RMSNorm", "layernorm_epsilon": hf_config.rms_norm_eps, "gated_linear_unit": True,
                "activation_func": F.silu, "add_bias_linear": False, "add_qkv_bias": qkv_bias(hf_config)}
    from megatron.core.activations import squared_relu

    # LayerNorm1P is layer_norm(x, 1 + weight, bias): megatron's zero-centred gamma. The MLP is
    # down(relu(up(x))^2). add_bias_linear biases q/k/v, o, fc1 and fc2 at once, as attention_bias and
    # mlp_bias (checked equal) do in HF.
    return {"normalization": "LayerNorm", "layernorm_zero_centered_gamma": True,
            "layernorm_epsilon": hf_config.norm_eps, "gated_linear_unit": False, "activation_func": squared_relu,
            "add_bias_linear": bool(hf_config.mlp_bias), "add_qkv_bias": qkv_bias(hf_config)}


class ZeroCenteredLayerNorm(torch.nn.LayerNorm):
    """megatron's ``layernorm_zero_centered_gamma`` LayerNorm in plain torch, op for op Nemotron's
    LayerNorm1P: ``layer_norm(x, weight + 1, bias)``. megatron-core 0.16's local spec has it only through
    Apex (FusedLayerNorm); its torch fallback (WrappedTorchNorm) asserts the flag is off."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.sequence_parallel:  # megatron's norms tag their weights for the SP gradient all-reduce
            raise NotImplementedError("parallel.sequence_parallel: needs Transformer Engine's norms")
        super().__init__(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


def transformer_config(hf_config, tp: int, pp: int, virtual_pp: int, dtype: torch.dtype, use_cpu_init: bool,
                       sequence_parallel: bool = False, recompute: bool = False):
    """The megatron ``TransformerConfig`` equivalent of ``hf_config`` (dropout off, no fused kernels that
    need CUDA extensions)."""
    from megatron.core.transformer import TransformerConfig

    check_supported(hf_config)
    heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads or hf_config.num_attention_heads
    if groups % tp:
        raise ValueError(f"parallel.tp={tp} must divide model.config.num_key_value_heads={groups}")
    if hf_config.num_hidden_layers % (pp * virtual_pp):
        raise ValueError(f"parallel.pp * parallel.virtual_pp = {pp * virtual_pp} must divide "
                         f"model.config.num_hidden_layers={hf_config.num_hidden_layers}")
    extra = {}
    if recompute:
        extra = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size, num_attention_heads=heads, num_query_groups=groups,
        kv_channels=head_dim(hf_config), **_family_fields(hf_config),
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual_pp if virtual_pp > 1 else None,
        sequence_parallel=sequence_parallel, params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, use_cpu_initialization=use_cpu_init, perform_initialization=False, **extra)


def build_gpt_model(hf_config, config, pre_process: bool, post_process: bool, vp_stage: int | None = None,
                    tie_output: bool | None = None):
    """One rank's GPTModel chunk, weights uninitialised (load them with :func:`load_hf_weights`).
    ``tie_output`` overrides ``hf_config.tie_word_embeddings`` (a reward model never ties its head)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    from megatron.core import tensor_parallel

    # TE's norms read config.normalization and config.layernorm_zero_centered_gamma themselves.
    spec = get_gpt_layer_with_transformer_engine_spec() if HAVE_TE else _local_spec(config, vp_stage)
    tied = hf_config.tie_word_embeddings if tie_output is None else tie_output
    model = GPTModel(config, spec, vocab_size=hf_config.vocab_size,
                     max_sequence_length=hf_config.max_position_embeddings, pre_process=pre_process,
                     post_process=post_process, share_embeddings_and_output_weights=tied,
                     position_embedding_type="rope", rotary_base=_rope_theta(hf_config),
                     rotary_percent=rotary_percent(hf_config), vp_stage=vp_stage)
    # megatron-core 0.16 marks weights as tensor-parallel only inside its weight initialisers, which
    # perform_initialization=False skips; unmarked shards would count once (TP rank 0) in the grad norm.
    split_dims = ((tensor_parallel.ColumnParallelLinear, 0), (tensor_parallel.VocabParallelEmbedding, 0),
                  (tensor_parallel.RowParallelLinear, 1))
    for module in model.modules():
        for kind, dim in split_dims:
            if isinstance(module, kind) and getattr(module, "weight", None) is not None \
                    and not hasattr(module.weight, "tensor_model_parallel"):
                tensor_parallel.set_tensor_model_parallel_attributes(module.weight, True, dim, 1)
    return model


def _local_spec(config, vp_stage: int | None):
    """megatron's own (no Transformer Engine) layer spec for ``config.normalization``; with zero-centred
    gamma, a block spec whose three norms are :class:`ZeroCenteredLayerNorm`."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    spec = get_gpt_layer_local_spec(normalization=config.normalization)
    if not config.layernorm_zero_centered_gamma:
        return spec
    layer = dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, input_layernorm=ZeroCenteredLayerNorm, pre_mlp_layernorm=ZeroCenteredLayerNorm))
    # A block spec, since from a layer spec TransformerBlock takes the final norm from its module-level
    # default (the torch fallback again).
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=ZeroCenteredLayerNorm)


# ---- names ----------------------------------------------------------------------------------------
# megatron name inside a layer (local spec; the TE spec fuses the norms into the next linear) -> HF names
_LAYER = {
    "input_layernorm.weight": ["input_layernorm.weight"],
    "self_attention.linear_qkv.layer_norm_weight": ["input_layernorm.weight"],
    "self_attention.linear_qkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight"],
    "self_attention.linear_qkv.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    "self_attention.linear_proj.weight": ["self_attn.o_proj.weight"],
    "pre_mlp_layernorm.weight": ["post_attention_layernorm.weight"],
    "mlp.linear_fc1.layer_norm_weight": ["post_attention_layernorm.weight"],
    "mlp.linear_fc1.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "mlp.linear_fc2.weight": ["mlp.down_proj.weight"],
    # Nemotron: LayerNorm biases, and the biases of o/up/down (attention_bias / mlp_bias)
    "input_layernorm.bias": ["input_layernorm.bias"],
    "self_attention.linear_qkv.layer_norm_bias": ["input_layernorm.bias"],
    "pre_mlp_layernorm.bias": ["post_attention_layernorm.bias"],
    "mlp.linear_fc1.layer_norm_bias": ["post_attention_layernorm.bias"],
    "self_attention.linear_proj.bias": ["self_attn.o_proj.bias"],
    "mlp.linear_fc1.bias": ["mlp.up_proj.bias"],
    "mlp.linear_fc2.bias": ["mlp.down_proj.bias"],
}
_UNGATED = {"mlp.linear_fc1.weight": ["mlp.up_proj.weight"]}  # Nemotron's MLP has no gate_proj
_TOP = {
    "embedding.word_embeddings.weight": ["model.embed_tokens.weight"],
    "decoder.final_layernorm.weight": ["model.norm.weight"],
    "decoder.final_layernorm.bias": ["model.norm.bias"],
    "output_layer.weight": ["lm_head.weight"],
}
_ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def _split(name: str) -> tuple[int | None, str]:
    """'decoder.layers.3.mlp.linear_fc1.weight' -> (3, 'mlp.linear_fc1.weight'); top-level -> (None, name)."""
    if name.startswith("decoder.layers."):
        index, rest = name[len("decoder.layers."):].split(".", 1)
        return int(index), rest
    return None, name


def hf_names(name: str, hf_layer: int | None, hf_config) -> list[str]:
    """The HF tensors a megatron parameter is made of (``hf_layer``: the global layer index)."""
    layer, rest = _split(name)
    if layer is None:
        if rest == "output_layer.weight" and hf_config.tie_word_embeddings:
            return ["model.embed_tokens.weight"]
        return _TOP[rest]
    names = _LAYER[rest] if _gated(hf_config) else _UNGATED.get(rest, _LAYER[rest])
    return [f"model.layers.{hf_layer}.{n}" for n in names]


def local_params(chunk) -> dict[str, tuple[int | None, torch.nn.Parameter]]:
    """This chunk's parameters by name, each with its GLOBAL layer index (None outside the layers)."""
    offsets = {i: layer.layer_number - 1 for i, layer in enumerate(chunk.decoder.layers)}
    out = {}
    for name, param in chunk.named_parameters():
        layer, _ = _split(name)
        out[name] = (None if layer is None else offsets[layer], param)
    return out


# ---- HF -> megatron (full tensors, then this rank's shard) ------------------------------------------
def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[q; k; v] (HF, heads-major) -> megatron's per-group [q_g..., k_g, v_g] along dim 0."""
    rest = q.shape[1:]
    q = q.reshape(groups, -1, *rest)
    k, v = k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _unfuse_qkv(fused: torch.Tensor, groups: int, q_rows: int) -> list[torch.Tensor]:
    rest = fused.shape[1:]
    per_group = fused.reshape(groups, -1, *rest)
    q_per, kv_per = q_rows // groups, (per_group.shape[1] - q_rows // groups) // 2
    q, k, v = per_group.split([q_per, kv_per, kv_per], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def to_megatron_shard(name: str, hf_tensors: list[torch.Tensor], hf_config, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's shard of megatron parameter ``name`` from the HF tensors :func:`hf_names` lists."""
    _, rest = _split(name)
    if rest.endswith("linear_qkv.weight") or rest.endswith("linear_qkv.bias"):
        fused = _fuse_qkv(*hf_tensors, groups=hf_config.num_key_value_heads or hf_config.num_attention_heads)
        return fused.chunk(tp, dim=0)[tp_rank]
    if rest == "mlp.linear_fc1.weight" and _gated(hf_config):
        gate, up = hf_tensors
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    (tensor,) = hf_tensors
    if rest in _ROW_PARALLEL:
        return tensor.chunk(tp, dim=1)[tp_rank]
    if rest in ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"):  # ungated: up_proj alone
        return tensor.chunk(tp, dim=0)[tp_rank]
    if rest in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if tensor.shape[0] % tp:
            raise ValueError(f"the vocabulary ({tensor.shape[0]}) must be divisible by parallel.tp={tp}; "
                             "padding it would change the softmax")
        return tensor.chunk(tp, dim=0)[tp_rank]
    return tensor  # norms and row-parallel biases: replicated


@torch.no_grad()
def load_hf_weights(chunk, hf_state: dict[str, torch.Tensor], hf_config, tp_rank: int, tp: int) -> None:
    """Copy this rank's shards of ``hf_state`` into every parameter of ``chunk`` (all of them: the
    chunk was built without initialisation)."""
    for name, (layer, param) in local_params(chunk).items():
        tensors = [hf_state[n] for n in hf_names(name, layer, hf_config)]
        shard = to_megatron_shard(name, tensors, hf_config, tp_rank, tp)
        if shard.shape != param.shape:
            raise ValueError(f"{name}: HF shard {tuple(shard.shape)} does not fit megatron {tuple(param.shape)}")
        param.copy_(shard)


# ---- megatron -> HF (gather TP shards) --------------------------------------------------------------
def from_megatron_shards(name: str, shards: list[torch.Tensor], hf_config) -> list[torch.Tensor]:
    """HF tensors from the ``tp`` shards (in TP-rank order) of megatron parameter ``name``, in the order
    :func:`hf_names` lists their names."""
    _, rest = _split(name)
    if rest.endswith("linear_qkv.weight") or rest.endswith("linear_qkv.bias"):
        groups = hf_config.num_key_value_heads or hf_config.num_attention_heads
        q_rows = hf_config.num_attention_heads * head_dim(hf_config)
        return _unfuse_qkv(torch.cat(shards, dim=0), groups, q_rows)
    if rest == "mlp.linear_fc1.weight" and _gated(hf_config):
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]
    if rest in _ROW_PARALLEL:
        return [torch.cat(shards, dim=1)]
    if rest in ("embedding.word_embeddings.weight", "output_layer.weight", "mlp.linear_fc1.weight",
                "mlp.linear_fc1.bias"):
        return [torch.cat(shards, dim=0)]
    return [shards[0]]
