"""Multi-attribute regression reward model: a CausalLM backbone with a linear head on the last token.

SteerLM / HelpSteer2 (Wang et al. 2024) and Nemotron-4 340B Reward: the decoder's final hidden state
at the last token of ``prompt + response`` goes through one ``Linear(hidden, A)``, one output per
attribute, trained by masked MSE (:func:`trainer.losses.reward_regression_loss`). A scalar reward for
ranking is a fixed weighted sum of the attributes (:func:`trainer.losses.combine_attributes`).

Only the backbone's base model runs (``backbone.base_model``): its LM head would compute [B, T, V]
logits the reward never reads, so it is skipped, and frozen (no gradient, no optimizer state) unless
it is tied to the input embeddings.

On disk (:meth:`RewardModel.save_pretrained`) the backbone is an ordinary transformers CausalLM
directory (``AutoModelForCausalLM.from_pretrained`` loads it) plus ``reward_head.safetensors`` and
``reward_config.json``. No parallelism here: strategies wrap the module from outside.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from trainer.config.paths import REWARD_CONFIG_FILE
from trainer.losses.reward import combine_attributes
from trainer.models import segment_attention
from trainer.models.hf import build_model

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = REWARD_CONFIG_FILE  # one name for the file, shared with the start-up path checks
FORMAT_VERSION = 1


class RewardModel(torch.nn.Module):
    """``forward(input_ids, attention_mask, last_index) -> [B, A]`` attribute scores."""

    # The strategy feeds a module that declares this (input_ids, attention_mask, last_index) and hands
    # its scores to the stage's loss instead of token log-probs (trainer.parallel.deepspeed.outputs).
    is_reward_model = True

    def __init__(self, backbone: PreTrainedModel, attributes: Sequence[str], attribute_weights: Sequence[float],
                 seed: int = 0):
        super().__init__()
        if len(attributes) == 0 or len(attributes) != len(attribute_weights):
            raise ValueError(f"need one weight per attribute, got {len(attribute_weights)} weights for "
                             f"{len(attributes)} attributes")
        self.backbone = backbone
        self.attributes = list(attributes)
        self.attribute_weights = [float(w) for w in attribute_weights]
        hidden = backbone.config.get_text_config().hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = torch.nn.Linear(hidden, len(self.attributes), dtype=torch.float32)
            # Small weights (the backbone's own init scale) so the backbone gets a gradient from the
            # first step; zero bias: the untrained model predicts ~0 for every attribute.
            torch.nn.init.normal_(self.head.weight, std=getattr(backbone.config, "initializer_range", 0.02))
            torch.nn.init.zeros_(self.head.bias)
        lm_head = backbone.get_output_embeddings()
        if lm_head is not None and lm_head.weight is not backbone.get_input_embeddings().weight:
            lm_head.requires_grad_(False)

    @property
    def config(self):
        """The backbone's transformers config (what ``export_hf`` and DeepSpeed look at)."""
        return self.backbone.config

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor,
                **decoder_inputs) -> torch.Tensor:
        """Scores read at ``last_index``: each right-padded row's last real token, or, with the
        ``decoder_inputs`` of :func:`trainer.models.segment_attention.last_token_row` (position ids and
        segments), each sequence's last position in that one padding-free row."""
        hidden = self.backbone.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                          **decoder_inputs).last_hidden_state
        last_index = last_index.to(hidden.device)
        if "segments" in decoder_inputs:
            last = hidden[0, last_index]
        else:
            last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]
        return self.head(last.to(self.head.weight.dtype))

    def scores(self, batch: dict[str, torch.Tensor], one_row: bool = True) -> torch.Tensor:
        """[B, A] scores of a ``collate_reward`` batch, through one padding-free row with attention per
        sequence where the backbone allows it (:func:`reward_inputs`), else the padded rows."""
        return self(**reward_inputs(batch, one_row and segment_attention.supported(self.config)))

    def reward(self, scores: torch.Tensor) -> torch.Tensor:
        """[B, A] attribute scores -> [B] scalar rewards with the stored attribute weights."""
        return combine_attributes(scores, self.attribute_weights)

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        safe_serialization: bool = True) -> None:
        """Write the backbone as a transformers CausalLM directory plus the head and its config.

        ``state_dict`` (e.g. a strategy's gathered full weights) uses this module's names,
        ``backbone.*`` and ``head.*``; None means the module's own weights.
        """
        directory = Path(directory)
        state_dict = self.state_dict() if state_dict is None else state_dict
        backbone, head = {}, {}
        for name, tensor in state_dict.items():
            if name.startswith("backbone."):
                backbone[name[len("backbone."):]] = tensor
            elif name.startswith("head."):
                head[name[len("head."):]] = tensor.detach().to("cpu", torch.float32).contiguous()
            else:
                raise ValueError(f"unexpected weight {name!r}: a reward model holds only backbone.* and head.*")
        if set(head) != {"weight", "bias"}:
            raise ValueError(f"reward head weights missing from the state dict (got {sorted(head)})")
        self.backbone.save_pretrained(directory, state_dict=backbone, safe_serialization=safe_serialization)
        save_file(head, str(directory / HEAD_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(
            {"format_version": FORMAT_VERSION, "attributes": self.attributes,
             "attribute_weights": self.attribute_weights}, indent=2))


def reward_inputs(batch: dict[str, torch.Tensor], one_row: bool) -> dict:
    """The keyword arguments of :meth:`RewardModel.forward` for a ``collate_reward`` batch. ``one_row``:
    the rows' real tokens end to end, each sequence attending to itself (segment attention), so no
    padding position goes through the backbone (the caller checks ``segment_attention.supported``)."""
    if not one_row:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "last_index")}
    segment_attention.register()
    input_ids, last_index, inputs = segment_attention.last_token_row(batch)
    return {"input_ids": input_ids, "last_index": last_index, **inputs}


def read_reward_config(path: str | Path) -> dict | None:
    """The ``reward_config.json`` of a reward model directory, None if ``path`` is not one."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return None
    config = json.loads(file.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {config.get('format_version')!r} is not "
                         f"{FORMAT_VERSION}, the one this stagecraft reads")
    return config


def _load_head(model: RewardModel, path: Path) -> None:
    head = load_file(str(path / HEAD_FILE))
    expected = {k: tuple(v.shape) for k, v in model.head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in head.items()}
    if got != expected:
        raise ValueError(f"{path / HEAD_FILE}: head weights {got} do not fit the backbone and attributes {expected}")
    model.head.load_state_dict(head)


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32) -> RewardModel:
    """A saved reward model (a reward stage's ``hf/``), on CPU in ``dtype``; never downloads."""
    path = Path(path)
    config = read_reward_config(path)
    if config is None:
        raise FileNotFoundError(f"{path} is not a reward model directory (no {CONFIG_FILE})")
    backbone = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    backbone.config.use_cache = False
    model = RewardModel(backbone, config["attributes"], config["attribute_weights"])
    _load_head(model, path)
    return model.to(dtype)


def build_reward_model(model_cfg: DictConfig, vocab_size: int, seed: int, attributes: Sequence[str],
                       attribute_weights: Sequence[float]) -> RewardModel:
    """The reward stage's starting model, float32 on CPU: the backbone from ``model.path`` (e.g. an SFT
    export) or built from config (:func:`trainer.models.build_model`) and a fresh seeded head. When
    ``model.path`` is itself a reward model with the same attributes, its head is kept too, so a
    reward model can be trained further."""
    model = RewardModel(build_model(model_cfg, vocab_size, seed), attributes, attribute_weights, seed)
    saved = read_reward_config(model_cfg.path) if model_cfg.path is not None else None
    if saved is not None and list(saved["attributes"]) == list(attributes):
        _load_head(model, Path(model_cfg.path))
    return model
