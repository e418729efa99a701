"""GGUF export of a Hugging Face model directory, for llama.cpp (``stagecraft export --format gguf``).

What llama.cpp reads, as its convert_hf_to_gguf.py writes it for these families:

- ``general.architecture`` "llama" for Llama and Mistral, "qwen2" for Qwen2, and under that prefix
  the hyper-parameters (context/embedding/feed-forward lengths, block and head counts, RoPE base and
  dimension count, RMSNorm epsilon, vocabulary size).
- Tensors renamed ``model.layers.N.self_attn.q_proj`` -> ``blk.N.attn_q`` and so on
  (:data:`TENSOR_NAMES`); ``lm_head`` is left out when the embeddings are tied (llama.cpp then
  reuses ``token_embd``).
- The Q/K permutation for "llama": HF's Llama rotates the two halves of each head
  (``rotate_half``: dims i and i + d/2 form a pair), llama.cpp's "llama" RoPE rotates adjacent dims
  (2i, 2i+1) as the original Meta checkpoint did; HF's conversion script had permuted Meta's rows
  into halves, and :func:`permute_qk` undoes that. Qwen2 uses llama.cpp's NEOX RoPE, which is
  HF's halves, so its rows are written as they are.
- The tokenizer and chat template (trainer/export/gguf_vocab.py).

Tensor types (``--outtype``): 1-D tensors (norms, biases) stay F32, as llama.cpp expects; matrices
are F16, BF16 or Q8_0 (gguf-py quantises Q8_0 itself; a matrix whose rows are not a multiple of
Q8_0's 32-value block is written F16). Q4_K_M needs llama.cpp's own quantiser, which gguf-py does not
have: it is taken from llama-cpp-python when installed (trainer/export/quantize.py), refused otherwise.

Memory: tensors are read one at a time from the safetensors files and written straight to disk
(header first, then each tensor), so exporting needs about one tensor's worth of memory, not the
model's. The file is written to ``<out>.tmp`` and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from trainer.export.gguf_vocab import read_vocab, write_vocab
from trainer.runtime.errors import BadInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    arch: str  # llama.cpp's general.architecture
    permute_qk: bool  # llama.cpp's "llama" RoPE pairs adjacent dims (see the module docstring)


# HF config.json model_type -> how llama.cpp runs it.
FAMILIES = {
    "llama": Family("llama", permute_qk=True),
    "mistral": Family("llama", permute_qk=True),  # llama.cpp runs Mistral as "llama"
    "qwen2": Family("qwen2", permute_qk=False),
}
OUTTYPES = ("f16", "bf16", "q8_0", "q4_k_m")

# HF parameter name (``{i}`` = layer) -> GGUF tensor name; the suffix (.weight / .bias) is kept.
TENSOR_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.{i}.input_layernorm": "blk.{i}.attn_norm",
    "model.layers.{i}.self_attn.q_proj": "blk.{i}.attn_q",
    "model.layers.{i}.self_attn.k_proj": "blk.{i}.attn_k",
    "model.layers.{i}.self_attn.v_proj": "blk.{i}.attn_v",
    "model.layers.{i}.self_attn.o_proj": "blk.{i}.attn_output",
    "model.layers.{i}.post_attention_layernorm": "blk.{i}.ffn_norm",
    "model.layers.{i}.mlp.gate_proj": "blk.{i}.ffn_gate",
    "model.layers.{i}.mlp.up_proj": "blk.{i}.ffn_up",
    "model.layers.{i}.mlp.down_proj": "blk.{i}.ffn_down",
}


def read_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise BadInput(f"{path}: not found; `stagecraft export` takes a Hugging Face model directory, such as "
                       "<run.dir>/stages/<stage>/hf")
    return json.loads(path.read_text())


def family_of(config: dict, hf_dir: Path) -> Family:
    """The family of ``config``, or BadInput naming the config field that llama.cpp could not run."""
    where = Path(hf_dir) / "config.json"
    kind = config.get("model_type")
    if kind not in FAMILIES:
        raise BadInput(f"{where}: model_type {kind!r} cannot be written as GGUF (supported: "
                       f"{', '.join(sorted(FAMILIES))})")
    if config.get("hidden_act", "silu") != "silu":
        raise BadInput(f"{where}: hidden_act {config['hidden_act']!r}; llama.cpp's {kind} is SwiGLU (silu)")
    if config.get("mlp_bias"):
        raise BadInput(f"{where}: mlp_bias true; MLP biases are not written")
    if kind != "qwen2" and config.get("attention_bias"):
        raise BadInput(f"{where}: attention_bias true; {kind} attention biases are not written")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise BadInput(f"{where}: rope_parameters.rope_type {rope.get('rope_type', rope.get('type'))!r}; only the "
                       "default RoPE is written (no RoPE scaling)")
    if kind == "qwen2" and config.get("use_sliding_window"):
        raise BadInput(f"{where}: use_sliding_window true; llama.cpp's qwen2 has no sliding-window attention")
    if kind == "mistral" and config.get("sliding_window"):
        log.info("%s: sliding_window %s is not written (llama.cpp runs Mistral as llama with full attention; "
                 "exact for contexts up to the window)", where, config["sliding_window"])
    return FAMILIES[kind]


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of each head from HF's (first half, second half) order back to interleaved pairs:
    row ``j`` of half ``h`` (j < d/2) goes to row ``2j + h``. Applies to a bias (1-D) too."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_name(hf_name: str) -> str | None:
    """The GGUF name of an HF parameter; None for buffers llama.cpp recomputes (RoPE's inv_freq)."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    stem, _, suffix = hf_name.rpartition(".")
    parts = stem.split(".")
    layer = next((p for p in parts if p.isdigit()), None)
    key = stem.replace(f".{layer}.", ".{i}.") if layer is not None else stem
    if key not in TENSOR_NAMES:
        raise BadInput(f"tensor {hf_name}: no GGUF name for it (known: {', '.join(TENSOR_NAMES)})")
    return TENSOR_NAMES[key].format(i=layer) + "." + suffix


def _safetensors_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return [hf_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise BadInput(f"{hf_dir}: no model.safetensors (or model.safetensors.index.json); export reads safetensors "
                   "weights (save_pretrained(safe_serialization=True), as stagecraft's hf/ exports are)")


def _tensors(hf_dir: Path, config: dict) -> Iterator[tuple[str, str, tuple[int, ...], object]]:
    """(HF name, GGUF name, shape, open safetensors file) of every tensor written; nothing is read yet."""
    from safetensors import safe_open

    tied = config.get("tie_word_embeddings", False)
    for path in _safetensors_files(hf_dir):
        with safe_open(str(path), framework="pt") as f:
            for hf_name in f.keys():
                name = gguf_name(hf_name)
                if name is not None and not (tied and name.startswith("output.")):
                    yield hf_name, name, tuple(f.get_slice(hf_name).get_shape()), f


def _load(f, hf_name: str, name: str, config: dict, family: Family) -> np.ndarray:
    """One tensor as float32, Q/K rows permuted where the family needs it."""
    data = f.get_tensor(hf_name).to(torch.float32).numpy()
    if family.permute_qk and ".attn_q." in name:
        return permute_qk(data, config["num_attention_heads"])
    if family.permute_qk and ".attn_k." in name:
        return permute_qk(data, config.get("num_key_value_heads") or config["num_attention_heads"])
    return data


def tensor_type(shape: tuple[int, ...], outtype: str):
    """The GGML type a tensor of ``shape`` is written as for ``outtype`` (f16, bf16 or q8_0)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return Q.F32
    if outtype == "bf16":
        return Q.BF16
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16


def _encode(data: np.ndarray, qtype) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return data.astype(np.float32)
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def _write_hparams(writer, config: dict, name: str) -> None:
    writer.add_name(name)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])


def default_output(hf_dir: Path, outtype: str) -> Path:
    """Beside the model directory, never inside it (a later stage fingerprints the files of the export
    it starts from, so an extra file there would make a rerun refused): ``<stage>/<stage>-<outtype>.gguf``
    for a stage's ``hf/`` export, else ``<hf_dir>-<outtype>.gguf``."""
    hf_dir = Path(hf_dir).resolve()
    if hf_dir.name == "hf":
        return hf_dir.parent / f"{hf_dir.parent.name}-{outtype}.gguf"
    return hf_dir.with_name(f"{hf_dir.name}-{outtype}.gguf")


FILE_TYPES = {"f16": 1, "q8_0": 7, "q4_k_m": 15, "bf16": 32}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def export_gguf(hf_dir: str | Path, out: str | Path | None = None, outtype: str = "f16") -> Path:
    """Write ``hf_dir`` (an HF model directory: config.json, safetensors, tokenizer.json) as one GGUF
    file; ``out`` defaults to :func:`default_output`. Returns the path written."""
    import gguf
    from transformers import AutoTokenizer

    hf_dir = Path(hf_dir)
    if outtype not in OUTTYPES:
        raise BadInput(f"--outtype: {outtype!r} is not one of {', '.join(OUTTYPES)}")
    config = read_config(hf_dir)
    family = family_of(config, hf_dir)
    out = Path(out) if out is not None else default_output(hf_dir, outtype)
    if outtype == "q4_k_m":
        from trainer.export.quantize import quantize_file, require_quantizer

        require_quantizer()  # refused before any work when llama.cpp's quantiser is missing
        f16 = out.with_name(out.name + ".f16.tmp")
        try:
            export_gguf(hf_dir, f16, "f16")
            return quantize_file(f16, out, outtype)
        finally:
            f16.unlink(missing_ok=True)

    vocab = read_vocab(hf_dir, config["vocab_size"])
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), family.arch)
    where = hf_dir.resolve()
    try:
        _write_hparams(writer, config, where.parent.name if where.name == "hf" else where.name)
        writer.add_file_type(FILE_TYPES[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, vocab, tokenizer)
        # The header lists every tensor before any data: declare them from their shapes, then write
        # them one at a time.
        for _, name, shape, _ in _tensors(hf_dir, config):
            qtype = tensor_type(shape, outtype)
            writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for hf_name, name, shape, f in _tensors(hf_dir, config):
            writer.write_tensor_data(_encode(_load(f, hf_name, name, config, family), tensor_type(shape, outtype)))
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    log.info("wrote %s (%s, %s, %.1f MB)", out, family.arch, outtype, out.stat().st_size / 1e6)
    return out
