"""``stagecraft plan``: check a layout and estimate memory per GPU before anything is queued.

    stagecraft plan recipe=align-nemotron4-340b-48n8g-tp8pp12 --gpu-memory 80
    stagecraft plan model=llama_1b parallel.tp=2 cluster.nnodes=2 cluster.nproc_per_node=8 --search

Takes the same Hydra overrides as a training run and composes the same config. Without a GPU it then
1. validates the config as the launcher does (``trainer.config.validate``, the batch arithmetic of
   every stage of a recipe included) and the model against the layout: ``parallel.tp`` must divide
   the attention heads, KV heads and FFN width (and, for megatron, the vocabulary),
   ``pp * virtual_pp`` the layers, and the family must be one the strategy can shard;
2. builds the process groups: megatron-core's ``initialize_model_parallel`` runs on torch's "fake"
   backend as rank 0 of the whole world (every rank creates every group, so one rank sees the rank
   list of each), and the TP / PP / DP / CP groups are checked to partition the world with TP groups
   inside a node; a few more ranks are then initialised to check that megatron's own rank getters
   agree with those lists. For 1,536 ranks one build takes ~0.1 s;
3. estimates memory per GPU for each stage (:mod:`trainer.launch.memory`) and says whether it fits
   ``--gpu-memory`` less ``--headroom``. ``--search`` enumerates strategy x TP x PP x ZeRO x recompute
   for the cluster size and prints the layouts that fit, ranked.

Exit code 0: valid and fits; 2: invalid (the message names the config key) or does not fit.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from unittest import mock

from omegaconf import DictConfig, OmegaConf

from trainer.config import CONFIG_DIR, ConfigError, register_configs, validate
from trainer.launch.memory import GIB, Estimate, Layout, ModelShape, estimate



def compose(overrides: list[str]) -> DictConfig:
    """The training run's config for these overrides (configs/config.yaml, Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def hf_config(cfg: DictConfig):
    """The transformers config of ``model``: ``model.path``'s config.json when that directory exists,
    otherwise ``model.arch`` + ``model.config`` (the vocabulary from ``model.config.vocab_size``, the
    benchmark's ``stage.vocab_size``, or the embedded tokenizer's size)."""
    from transformers import AutoConfig

    path = None if OmegaConf.is_missing(cfg.model, "path") else cfg.model.path
    if path is not None and (Path(path) / "config.json").is_file():
        return AutoConfig.from_pretrained(path, local_files_only=True)
    overrides = OmegaConf.to_container(cfg.model.config, resolve=True)
    vocab = overrides.pop("vocab_size", None) or cfg.stage.get("vocab_size") or cfg.model.embedded_vocab_size
    return AutoConfig.for_model(cfg.model.arch, vocab_size=vocab, **overrides)


def stages(cfg: DictConfig, world: int | None = None) -> list[DictConfig]:
    """The stage configs a run trains, validated as the launcher validates them when ``world`` is
    given (raises ConfigError naming the key): a recipe's stages in order (``check_recipe``), or
    ``stage``."""
    if cfg.recipe is None:
        if world is not None:
            validate(_with_model_path(cfg), world)
        return [cfg.stage]
    from trainer.recipe.plan import check_recipe, plan as plan_recipe

    planned = check_recipe(_with_model_path(cfg), world) if world is not None else plan_recipe(cfg.recipe)
    return [p.config for p in planned]


def _with_model_path(cfg: DictConfig) -> DictConfig:
    """``cfg`` with a missing (``???``) model.path as null: the planner needs no checkpoint."""
    if not OmegaConf.is_missing(cfg.model, "path"):
        return cfg
    cfg = cfg.copy()
    cfg.model.path = None
    return cfg


def world_size(cfg: DictConfig) -> int:
    return cfg.cluster.nnodes * cfg.cluster.nproc_per_node


def check_model(shape: ModelShape, hf, parallel: DictConfig) -> list[str]:
    """Rules the model imposes on the layout; raises ConfigError naming the key. Returns notes."""
    t, layers, chunks = parallel.tp, shape.layers, parallel.pp * parallel.virtual_pp
    for count, key in ((shape.heads, "num_attention_heads"), (shape.kv_heads, "num_key_value_heads"),
                       (shape.ffn, "intermediate_size")):
        if count % t:
            raise ConfigError(f"parallel.tp: {t} does not divide model.config.{key}={count}")
    if layers % chunks:
        raise ConfigError(f"parallel.pp: pp * virtual_pp = {parallel.pp} * {parallel.virtual_pp} = {chunks} "
                          f"does not divide model.config.num_hidden_layers={layers}")
    notes = []
    if parallel.strategy == "megatron":
        from trainer.models.megatron_convert import SUPPORTED

        if shape.family not in SUPPORTED:
            raise ConfigError(f"model.arch: {shape.family!r} has no megatron mapping (supported: "
                              f"{', '.join(SUPPORTED)}); use parallel.strategy=deepspeed")
        if shape.vocab % t:
            raise ConfigError(f"parallel.tp: {t} does not divide the vocabulary ({shape.vocab}); the megatron "
                              f"strategy does not pad it to {-(-shape.vocab // t) * t} (padding changes the softmax)")
        notes.append(f"vocabulary {shape.vocab} = {t} x {shape.vocab // t} rows per tensor rank")
    elif t > 1:
        from trainer.parallel.deepspeed import autotp_section

        try:
            autotp_section(hf, t)
        except NotImplementedError as err:
            raise ConfigError(str(err)) from None
        notes.append(f"AutoTP: vocabulary {shape.vocab} kept whole for the loss (head "
                     f"{'replicated, tied' if shape.tied else f'column-parallel, {-(-shape.vocab // t)} rows per rank'})")
    return notes


@dataclass
class GroupCheck:
    world: int
    seconds: float
    counts: dict[str, int]
    probed: list[int]
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _fake_world(world: int, rank: int):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        raise RuntimeError("stagecraft plan builds its groups on a fake process group; torch.distributed is "
                           "already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


_KINDS = {"tp": "TENSOR_MODEL_PARALLEL_GROUP", "pp": "PIPELINE_MODEL_PARALLEL_GROUP",
          "dp": "DATA_PARALLEL_GROUP", "cp": "CONTEXT_PARALLEL_GROUP"}


def build_groups(parallel: DictConfig, world: int, nproc_per_node: int, probes: int = 3) -> GroupCheck:
    """megatron-core's groups for this layout on a fake process group (module docstring, step 2)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
    sizes = {"tp": parallel.tp, "pp": parallel.pp, "cp": parallel.cp,
             "dp": world // (parallel.tp * parallel.pp * parallel.cp)}

    def init():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
            context_parallel_size=parallel.cp, create_gloo_process_groups=False,
            virtual_pipeline_model_parallel_size=parallel.virtual_pp if parallel.virtual_pp > 1 else None)

    recorded: list[tuple[str, list[int]]] = []
    create = parallel_state.create_group

    def record(ranks=None, **kwargs):
        recorded.append((kwargs.get("group_desc"), list(ranks)))
        return create(ranks=ranks, **kwargs)

    started = time.perf_counter()
    with mock.patch.object(parallel_state, "create_group", record), _fake_world(world, 0):
        init()
    seconds = time.perf_counter() - started
    groups = {kind: [ranks for desc, ranks in recorded if desc == name] for kind, name in _KINDS.items()}
    for kind, lists in groups.items():
        members = sorted(r for ranks in lists for r in ranks)
        if members != list(range(world)) or any(len(ranks) != sizes[kind] for ranks in lists):
            raise ConfigError(f"parallel.{kind}: megatron's {_KINDS[kind]}s do not partition the {world} ranks "
                              f"into groups of {sizes[kind]}")
    notes = []
    split = [ranks for ranks in groups["tp"] if ranks[0] // nproc_per_node != ranks[-1] // nproc_per_node]
    if split:
        notes.append(f"{len(split)} tensor-parallel groups span nodes (e.g. ranks {split[0]}): every layer's "
                     f"all-reduce would cross the network; keep parallel.tp <= cluster.nproc_per_node")
    # A few ranks, each initialised as itself: megatron's getters must agree with the recorded lists.
    probed = sorted({0, world - 1, world // 2 + parallel.tp // 2}) if probes else []
    for rank in probed:
        with _fake_world(world, rank):
            init()
            for kind, getter in (("tp", parallel_state.get_tensor_model_parallel_rank),
                                 ("pp", parallel_state.get_pipeline_model_parallel_rank),
                                 ("dp", parallel_state.get_data_parallel_rank)):
                ranks = next(r for r in groups[kind] if rank in r)
                if ranks.index(rank) != getter():
                    raise ConfigError(f"parallel.{kind}: rank {rank} is {getter()} in megatron's group but at "
                                      f"position {ranks.index(rank)} of {ranks}")
    return GroupCheck(world=world, seconds=seconds, counts={k: len(v) for k, v in groups.items()},
                      probed=probed, notes=notes)


def layout_for(cfg: DictConfig, stage: DictConfig, world: int, **changes) -> Layout:
    p = cfg.parallel
    dp = world // (p.tp * p.pp * p.cp)
    preference = stage.type == "preference"
    seq = stage.seq_length if stage.type == "benchmark" else cfg.data.max_length
    layout = Layout(strategy=p.strategy, tp=p.tp, pp=p.pp, vpp=p.virtual_pp, dp=dp, zero_stage=p.zero_stage,
                    distributed_optimizer=p.distributed_optimizer, precision=p.precision,
                    offload_optimizer=p.offload_optimizer, recompute=p.activation_checkpointing,
                    sequence_parallel=p.sequence_parallel, rows=stage.micro_batch_size * (2 if preference else 1),
                    seq_len=seq // p.cp, micro_batches=max(1, stage.global_batch_size // (stage.micro_batch_size * dp)),
                    reference=stage.reference_mode if preference else "none", trains=stage.type != "annotate",
                    lm_head=stage.type not in ("reward", "annotate"))
    return replace(layout, **changes)


@dataclass
class StagePlan:
    name: str
    layout: Layout
    estimate: Estimate


@dataclass
class Plan:
    world: int
    params: int
    groups: GroupCheck | None
    stages: list[StagePlan]
    notes: list[str]


def make_plan(cfg: DictConfig, groups: bool = True) -> Plan:
    """Validate ``cfg`` (raises ConfigError) and estimate every stage; ``groups``: build them too."""
    world = world_size(cfg)
    hf = hf_config(cfg)
    shape = ModelShape.from_hf_config(hf)
    planned = stages(cfg, world)
    notes = check_model(shape, hf, cfg.parallel)
    check = build_groups(cfg.parallel, world, cfg.cluster.nproc_per_node) if groups else None
    out = [StagePlan(stage.name, (lay := layout_for(cfg, stage, world)), estimate(shape, lay)) for stage in planned]
    return Plan(world=world, params=shape.total_params(), groups=check, stages=out, notes=notes)


def usable_bytes(gpu_memory_gib: float, headroom: float) -> float:
    return gpu_memory_gib * (1 - headroom) * GIB


def describe(layout: Layout) -> str:
    if layout.strategy == "megatron":
        extra = ["distributed optimizer" if layout.distributed_optimizer else "plain optimizer"]
        extra += ["sequence parallel"] if layout.sequence_parallel else []
        extra += [f"virtual pp {layout.vpp}"] if layout.vpp > 1 else []
    else:
        extra = [f"ZeRO-{layout.zero_stage}"] + (["optimizer offload"] if layout.offload_optimizer else [])
    extra += ["full recompute"] if layout.recompute else []
    return (f"{layout.strategy} tp={layout.tp} pp={layout.pp} dp={layout.dp} {layout.precision}, "
            + ", ".join(extra))


def report(cfg: DictConfig, plan: Plan, gpu_memory: float, headroom: float) -> tuple[str, bool]:
    """The printed report, and whether every stage fits."""
    usable = usable_bytes(gpu_memory, headroom)
    c = cfg.cluster
    lines = [f"world: {plan.world} ranks = {c.nnodes} node(s) x {c.nproc_per_node}; model {plan.params / 1e9:.2f}B "
             f"parameters"]
    lines.append(f"layout: {describe(plan.stages[0].layout)}")
    if plan.groups is not None:
        g = plan.groups
        lines.append(f"groups: built on a fake process group for {g.world} ranks in {g.seconds:.2f} s: "
                     + ", ".join(f"{n} {k.upper()} groups of {g.world // n}" for k, n in g.counts.items() if n < g.world)
                     + f"; ranks {', '.join(map(str, g.probed))} re-initialised as themselves and checked")
        lines += [f"  note: {n}" for n in g.notes]
    lines += [f"note: {n}" for n in plan.notes]
    fits = True
    for sp in plan.stages:
        est, lay = sp.estimate, sp.layout
        ok = est.total <= usable
        fits &= ok
        lines.append(f"stage {sp.name}: {lay.rows} x {lay.seq_len} tokens per micro-batch, {lay.micro_batches} "
                     f"micro-batches per step per data-parallel rank; reference {lay.reference}")
        lines.append(f"  memory per GPU ({est.stage} pipeline stage, {est.params / 1e9:.3f}B parameters):")
        for name in Estimate.COMPONENTS:
            value = getattr(est, name)
            if value:
                lines.append(f"    {name:<14}{value / GIB:8.1f} GiB")
        if est.cpu_optimizer:
            lines.append(f"    (host: optimizer {est.cpu_optimizer / GIB:.1f} GiB per rank)")
        lines.append(f"    {'total':<14}{est.total / GIB:8.1f} GiB of {usable / GIB:.1f} usable "
                     f"({gpu_memory:g} GiB less {headroom:.0%}): {'fits' if ok else 'DOES NOT FIT'}")
        lines += [f"    note: {n}" for n in est.notes]
    return "\n".join(lines), fits


def candidates(cfg: DictConfig, shape: ModelShape, hf) -> list[DictConfig]:
    """Parallel configs for this cluster: tp within a node, pp dividing the layers (megatron), ZeRO
    0-3 (deepspeed), with and without recompute; invalid ones dropped by the planner's own checks."""
    world, per_node = world_size(cfg), cfg.cluster.nproc_per_node
    tps = [t for t in (1, 2, 4, 8, 16) if t <= per_node and world % t == 0]
    out = []
    for strategy, tp, recompute in itertools.product(("deepspeed", "megatron"), tps, (False, True)):
        pps = [1] if strategy == "deepspeed" else [p for p in range(1, shape.layers + 1)
                                                   if shape.layers % p == 0 and world % (tp * p) == 0]
        zeros = (0, 1, 2, 3) if strategy == "deepspeed" else (0,)
        for pp, zero in itertools.product(pps, zeros):
            p = OmegaConf.merge(cfg.parallel, {"strategy": strategy, "tp": tp, "pp": pp, "dp": -1, "virtual_pp": 1,
                                               "zero_stage": zero, "activation_checkpointing": recompute,
                                               "offload_optimizer": False,
                                               "sequence_parallel": strategy == "megatron" and tp > 1})
            out.append(p)
    return out


def search(cfg: DictConfig, gpu_memory: float, headroom: float) -> list[tuple[tuple, DictConfig, float]]:
    """Layouts that validate and fit, ranked (best first) by: no recompute (recompute costs another
    forward, ~1/3 more compute); smaller 1F1B bubble (pp-1)/(M+pp-1); ZeRO <= 2 before ZeRO-3 (which
    gathers weights again in backward, +50 % data-parallel traffic); smaller tp (an all-reduce per
    layer); then more free memory. Returns (rank key, parallel config, largest stage total)."""
    hf = hf_config(cfg)
    shape = ModelShape.from_hf_config(hf)
    usable = usable_bytes(gpu_memory, headroom)
    world = world_size(cfg)
    ranked = []
    for parallel in candidates(cfg, shape, hf):
        trial = OmegaConf.merge(cfg, {"parallel": parallel})
        try:
            stages(trial, world)
            check_model(shape, hf, trial.parallel)
        except ConfigError:
            continue
        worst = max(estimate(shape, layout_for(trial, s, world)).total for s in stages(trial))
        if worst > usable:
            continue
        m = min(layout_for(trial, s, world).micro_batches for s in stages(trial))
        bubble = (parallel.pp - 1) / (m + parallel.pp - 1)
        key = (parallel.activation_checkpointing, round(bubble, 3), parallel.zero_stage == 3, parallel.tp,
               worst - usable)
        ranked.append((key, parallel, worst))
    ranked.sort(key=lambda item: item[0])
    return ranked


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="stagecraft plan", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for a training run")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--headroom", type=float, default=0.1,
                        help="fraction kept free for the CUDA context, NCCL buffers and fragmentation (0.1)")
    parser.add_argument("--search", action="store_true", help="rank the layouts that fit this cluster")
    parser.add_argument("--top", type=int, default=10, help="rows of the --search table")
    args = parser.parse_args(argv)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    try:
        cfg = compose(args.overrides)
    except Exception as err:  # noqa: BLE001  (Hydra's own message names the override or file)
        print(f"stagecraft plan: could not compose the config: {err}", file=sys.stderr)
        return 2
    try:
        if args.search:
            ranked = search(cfg, args.gpu_memory, args.headroom)
            print(f"{len(ranked)} layouts fit {args.gpu_memory:g} GiB (less {args.headroom:.0%}) on "
                  f"{world_size(cfg)} GPUs; best first:")
            for i, (_, p, worst) in enumerate(ranked[:args.top], 1):
                stage = stages(OmegaConf.merge(cfg, {"parallel": p}))[0]
                print(f"{i:3d}. {describe(layout_for(OmegaConf.merge(cfg, {'parallel': p}), stage, world_size(cfg)))}"
                      f"  — largest stage {worst / GIB:.1f} GiB")
            return 0 if ranked else 2
        plan = make_plan(cfg)
    except ConfigError as err:
        print(f"stagecraft plan: {err}", file=sys.stderr)
        return 2
    text, fits = report(cfg, plan, args.gpu_memory, args.headroom)
    print(text)
    return 0 if fits else 2
