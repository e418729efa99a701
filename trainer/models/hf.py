"""Hugging Face CausalLM models: from a local checkpoint directory, or built from a config.

No parallelism here: strategies wrap what these functions return.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel


def build_model(model_cfg: DictConfig, vocab_size: int, seed: int) -> PreTrainedModel:
    """The stage's starting model in float32 on CPU (strategies cast and move it).

    ``model.path`` set: load that local directory (``local_files_only``: never a hub download).
    Otherwise build ``model.arch`` from ``model.config`` with ``vocab_size`` from the tokenizer and a
    seeded random init, so every rank builds identical weights.
    """
    attn = model_cfg.attn_implementation
    if model_cfg.path is not None:
        path = Path(model_cfg.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path: {path} is not a Hugging Face model directory (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                     attn_implementation=attn)
    else:
        overrides = OmegaConf.to_container(model_cfg.config, resolve=True)
        # A published architecture's vocab_size (configs/model/llama3_8b.yaml: the planner sizes the
        # embedding by it) yields to the tokenizer's: the embedding must match the tokenizer it runs with.
        overrides.pop("vocab_size", None)
        config = AutoConfig.for_model(model_cfg.arch, vocab_size=vocab_size, **overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Parameter count, also for a model loaded into ZeRO-3 partitions (whose tensors are empty)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


# Config fields through which a CausalLM transforms its head's output before returning logits (Gemma's
# soft-capping, Cohere's and Granite's scaling), with the value that leaves the logits unchanged.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_softcap": None, "logit_scale": 1.0,
                     "logits_scaling": 1.0}


def logits_are_head_output(model: PreTrainedModel) -> bool:
    """True when the model's logits are its output embedding (an ``nn.Linear``) applied to the decoder's
    last hidden state, nothing after: the condition for computing log-probs from the hidden states with
    the head's weight directly (trainer.losses.chunked)."""
    if not isinstance(model.get_output_embeddings(), torch.nn.Linear):
        return False
    config = model.config
    return all(getattr(config, key, plain) in (None, plain) for key, plain in _LOGIT_TRANSFORMS.items())
