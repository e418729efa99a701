"""Start-up validation of rules a type system cannot express.

Each error names the config key, so a user can fix the override that caused it.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from trainer.config.schema import Config
from trainer.runtime.signals import signal_numbers


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the dotted key."""


def choice(cfg: DictConfig, key: str, allowed: tuple) -> None:
    value = _get(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, allowed))}; got {value!r}")


def positive(cfg: DictConfig, key: str, allow_zero: bool = False) -> None:
    value = _get(cfg, key)
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: must be {bound}; got {value!r}")


def required(cfg: DictConfig) -> None:
    """A ``???`` left in the composed config (a model path, a recipe's data files) is one error naming
    every such key, before any worker starts, rather than a traceback from the first worker to read it."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: required but not given (??? in the config){_also(missing)}; set it on "
                          f"the command line, e.g. {missing[0]}=<value>")


def _also(keys: list[str]) -> str:
    return f"; also missing: {', '.join(keys[1:])}" if len(keys) > 1 else ""


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate(cfg: DictConfig, world_size: int | None = None) -> None:
    """Check cross-field rules; ``world_size`` adds the parallel-layout checks once it is known."""
    from trainer.stages.registry import stage_type

    required(cfg)
    kind = stage_type(cfg.stage.type)
    try:
        # Hydra's `+key=value` opens the struct flag; re-merging onto the schema (with the stage
        # type's own schema) catches such extras.
        plain = OmegaConf.to_container(cfg, resolve=False)
        stage = plain.pop("stage")
        OmegaConf.merge(OmegaConf.structured(Config), plain)
        OmegaConf.merge({"stage": OmegaConf.structured(kind.schema)}, {"stage": stage})
    except ConfigKeyError as err:
        raise ConfigError(f"{err.full_key}: not a config key of stagecraft (see trainer/config/schema.py)") from None
    choice(cfg, "parallel.strategy", ("deepspeed", "megatron"))
    choice(cfg, "parallel.zero_stage", (0, 1, 2, 3))
    choice(cfg, "parallel.precision", ("fp32", "bf16"))
    choice(cfg, "parallel.device", ("auto", "cpu", "cuda"))
    choice(cfg, "parallel.backend", ("auto", "gloo", "nccl"))
    positive(cfg, "parallel.logits_chunk_tokens", allow_zero=True)
    choice(cfg, "stage.loss_reduction", ("token", "sample"))
    choice(cfg, "stage.optim.schedule", ("cosine", "constant"))
    choice(cfg, "data.truncation", ("right", "left", "drop"))
    _check_mix(cfg)
    choice(cfg, "data.on_bad_record", ("error", "skip"))
    choice(cfg, "logging.wandb_mode", ("offline", "online", "disabled"))
    choice(cfg, "checkpoint.on_change", ("refuse", "restart", "resume"))
    try:
        signal_numbers(cfg.run.stop_signals)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not cfg.parallel.timeout_minutes > 0:
        raise ConfigError(f"parallel.timeout_minutes: must be > 0; got {cfg.parallel.timeout_minutes!r}")
    for key in ("parallel.tp", "parallel.pp", "parallel.cp", "parallel.virtual_pp", "stage.epochs", "stage.global_batch_size",
                "stage.micro_batch_size", "data.max_length", "cluster.nproc_per_node", "cluster.nnodes",
                "logging.log_every"):
        positive(cfg, key)
    for key in ("stage.optim.lr", "stage.optim.grad_clip", "stage.optim.warmup_steps", "stage.neftune_alpha",
                "stage.eval_every", "stage.eval_max_new_tokens", "checkpoint.every_steps", "checkpoint.keep_last",
                "stage.max_bad_steps", "cluster.master_port", "cluster.shutdown_timeout"):
        positive(cfg, key, allow_zero=True)
    if kind.check is not None:
        kind.check(cfg)
    if cfg.checkpoint.keep_last == 0:
        raise ConfigError("checkpoint.keep_last: must be >= 1 (the latest checkpoint is always kept)")
    if not 0.0 <= cfg.stage.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"stage.optim.min_lr_ratio: must be in [0, 1]; got {cfg.stage.optim.min_lr_ratio}")
    if cfg.parallel.strategy == "deepspeed":
        if cfg.parallel.pp != 1:
            raise ConfigError("parallel.pp: the deepspeed strategy has no pipeline parallelism; "
                              "use parallel.strategy=megatron for pp > 1")
        if cfg.parallel.cp != 1:
            raise ConfigError("parallel.cp: the deepspeed strategy has no context parallelism; "
                              "use parallel.strategy=megatron for cp > 1")
        if cfg.parallel.offload_optimizer and cfg.parallel.zero_stage == 0:
            raise ConfigError("parallel.offload_optimizer: needs parallel.zero_stage >= 1")
        if cfg.parallel.virtual_pp != 1 or cfg.parallel.sequence_parallel:
            raise ConfigError("parallel.virtual_pp / parallel.sequence_parallel: megatron-only options; "
                              "set parallel.strategy=megatron")
    else:  # megatron
        if cfg.parallel.cp != 1:
            raise ConfigError("parallel.cp: context parallelism is not wired into the megatron strategy "
                              "(megatron's local layer spec has no context-parallel attention; with Transformer "
                              "Engine the sequence split and a context-parallel log-prob sum are still missing)")
        if cfg.parallel.offload_optimizer:
            raise ConfigError("parallel.offload_optimizer: not supported by parallel.strategy=megatron")
        if cfg.parallel.zero_stage != 0:
            raise ConfigError("parallel.zero_stage: the megatron strategy shards optimizer state with "
                              "parallel.distributed_optimizer, not ZeRO; set parallel.zero_stage=0")
        if cfg.stage.get("neftune_alpha", 0) > 0:
            raise ConfigError("stage.neftune_alpha: NEFTune is not implemented for parallel.strategy=megatron")
        resolve_layout(cfg)  # refuses an explicit stage.packing / stage.prefix_sharing it cannot run
    if cfg.model.path is None and cfg.model.tokenizer is not None:
        raise ConfigError("model.tokenizer: set model.path too; a model built from config uses the embedded "
                          "tokenizer, whose vocabulary sets its embedding size")
    if cfg.get("recipe") is not None:  # every stage of a recipe (the root `stage` is not one of them)
        from trainer.recipe.plan import check_recipe

        check_recipe(cfg, world_size)
    elif world_size is not None:
        validate_layout(cfg, world_size)


def _check_mix(cfg: DictConfig) -> None:
    mix = cfg.data.get("mix") or []
    if mix and cfg.data.train:
        raise ConfigError("data.mix: give the training files either as data.train or as data.mix sources, not both")
    for i, source in enumerate(mix):
        if not source.train:
            raise ConfigError(f"data.mix[{i}].train: a mix source needs at least one file")
        if not source.weight > 0:
            raise ConfigError(f"data.mix[{i}].weight: must be > 0, got {source.weight}")
        if source.max_samples < -1:
            raise ConfigError(f"data.mix[{i}].max_samples: -1 (no cap) or a count >= 0, got {source.max_samples}")


def data_parallel_size(cfg: DictConfig, world_size: int) -> int:
    """dp implied by the layout; raises ConfigError naming the keys when it does not tile the world."""
    p = cfg.parallel
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ConfigError(f"parallel.tp*pp*cp = {p.tp}*{p.pp}*{p.cp} = {model_parallel} does not divide "
                          f"the world size {world_size}")
    dp = world_size // model_parallel
    if p.dp not in (-1, dp):
        raise ConfigError(f"parallel.dp: tp*pp*cp*dp = {model_parallel}*{p.dp} = {model_parallel * p.dp} "
                          f"must equal the world size {world_size} (or set parallel.dp=-1)")
    return dp


def validate_layout(cfg: DictConfig, world_size: int) -> None:
    dp = data_parallel_size(cfg, world_size)
    from trainer.stages.registry import stage_type

    if not stage_type(cfg.stage.type).optimizer_steps:  # no global batch to tile
        return
    s = cfg.stage
    per_step = s.micro_batch_size * dp
    if s.global_batch_size % per_step:
        raise ConfigError(f"stage.global_batch_size: {s.global_batch_size} must be a multiple of "
                          f"stage.micro_batch_size * dp = {s.micro_batch_size} * {dp} = {per_step}")
    accum = s.global_batch_size // per_step
    if cfg.parallel.virtual_pp > 1 and accum % cfg.parallel.pp:
        raise ConfigError(f"parallel.virtual_pp: interleaved pipelines need the micro-batches per step "
                          f"({accum}) to be a multiple of parallel.pp={cfg.parallel.pp}")


# The batch layouts each strategy's forward takes besides right-padded rows. deepspeed hands
# transformers position ids (packed rows) or a 4D mask (prompt-shared rows); megatron's GPTModel is run
# with plain causal attention and refuses both (trainer/parallel/megatron.py, MegatronStrategy._run).
FAST_LAYOUTS = {"deepspeed": {"packing", "prefix_sharing"}, "megatron": set()}
# What each layout needs from the strategy's forward (for the refusal).
_LAYOUT_NEEDS = {"packing": "packed rows need a per-sequence attention mask",
                 "prefix_sharing": "prompt-shared rows need a 4D attention mask"}
# Attention implementations that read a custom 4D additive mask as it is (transformers masking_utils).
_MASKED_ATTENTION = ("sdpa", "eager")


def resolve_layout(cfg: DictConfig) -> dict[str, bool]:
    """``{"packing": bool, "prefix_sharing": bool}`` for the stage of ``cfg``: an explicit true/false
    is kept, null (auto) is on wherever the strategy's forward supports the layout, since neither
    changes a loss (tests/test_fast_paths.py). Prompt sharing is a preference-stage layout and needs an
    attention that takes a 4D mask; the reward stage pads (its head reads each row's last token)."""
    fast = FAST_LAYOUTS[cfg.parallel.strategy]
    kind = cfg.stage.type
    out = {}
    for key, applies in (("packing", kind in ("sft", "preference")),
                         ("prefix_sharing", kind == "preference"
                          and cfg.model.get("attn_implementation", "sdpa") in _MASKED_ATTENTION)):
        value = cfg.stage.get(key)
        if value is None:
            value = applies and key in fast
        elif value and key not in fast:
            raise ConfigError(f"stage.{key}: parallel.strategy={cfg.parallel.strategy} has no attention mask for "
                              f"this layout ({_LAYOUT_NEEDS[key]}); set stage.{key}=false (or leave it null: auto)")
        out[key] = bool(value)
    return out
