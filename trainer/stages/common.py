"""Pieces every stage loop shares: tokenizer, data files, tokenised datasets, global counts, markers."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from trainer.checkpoint import CheckpointManager, export_hf, write_text_atomic
from trainer.checkpoint.manager import MARKER
from trainer.data.chat import TemplateError, tokenize_chat
from trainer.data.cache import build_cache, cache_key, open_cache
from trainer.data.mixing import MixedDataset, mix_counts, mix_index, proportions
from trainer.data.records import DataError, DropLog, validate_chat_record
from trainer.data.sources import RecordStream, data_files_of
from trainer.data.preference import synthetic_preference_records, synthetic_reward_records
from trainer.data.synthetic import generate_chat_records, write_jsonl
from trainer.data.tokenizer import build_embedded_tokenizer, load_tokenizer
from trainer.logging import MetricsLogger
from trainer.logging.metrics import dumps
from trainer.models import count_parameters
from trainer.parallel.strategy import build_strategy
from trainer.parallel.topology import Topology
from trainer.runtime import identity, signals
from trainer.runtime.errors import BadInput, Diverged, Preempted, Refused

log = logging.getLogger(__name__)
STAGE_MARKER = "COMPLETE.json"


def stage_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run.dir) / "stages" / cfg.stage.name


def build_tokenizer(cfg: DictConfig):
    """The model's own tokenizer when it has one, else the embedded SentencePiece tokenizer."""
    source = cfg.model.tokenizer or cfg.model.path
    if source is not None:
        return load_tokenizer(source)
    return build_embedded_tokenizer(cfg.model.embedded_vocab_size, Path(cfg.data.cache_dir) / "tokenizers",
                                    corpus=cfg.model.embedded_corpus)


# The synthetic generator of each data kind, and the file prefix it is written under.
SYNTHETIC = {"sft": generate_chat_records, "preference": synthetic_preference_records,
             "reward": synthetic_reward_records}


def data_files(cfg: DictConfig, topology: Topology, kind: str = "sft") -> tuple[list[Path], list[Path]]:
    """The train / eval JSONL files; with none configured, rank 0 writes the synthetic ``kind`` ones
    (again whenever ``data.synthetic`` differs from what wrote the files on disk)."""
    if cfg.data.train or cfg.data.mix:
        return [Path(p) for p in cfg.data.train] + mix_files(cfg.data), [Path(p) for p in cfg.data.eval]
    syn = cfg.data.synthetic
    out = Path(cfg.run.dir) / "data"
    train, eval_ = out / f"{kind}_train.jsonl", out / f"{kind}_eval.jsonl"
    spec = out / f"{kind}_synthetic.json"
    wanted = json.dumps(OmegaConf.to_container(syn, resolve=True), sort_keys=True)
    current = train.is_file() and eval_.is_file() and spec.is_file() and spec.read_text() == wanted
    if topology.is_main and not current:
        out.mkdir(parents=True, exist_ok=True)
        families = list(syn.families)
        generate = SYNTHETIC[kind]
        write_jsonl(train, generate(syn.n_train, syn.seed, families))
        # A different seed stream, so held-out prompts are new draws, not the training ones.
        write_jsonl(eval_, generate(syn.n_eval, syn.seed + 1_000_003, families))
        write_text_atomic(spec, wanted)
    topology.barrier()
    return [train], [eval_]


def mix_files(data_cfg: DictConfig) -> list[Path]:
    """Every file of ``data.mix``, in order."""
    return [Path(p) for source in data_cfg.get("mix") or [] for p in source.train]


def train_examples(cfg: DictConfig, train_files: list[Path],
                   load: Callable[[list[Path]], tuple[Sequence[dict], dict]]) -> tuple[Sequence[dict], dict]:
    """The training examples: ``load(train_files)``; with ``data.mix``, each source loaded on its own
    (its own tokenised cache) and mixed by index (trainer/data/mixing.py), nothing written. The stats
    add up the sources' read counts and give the realised share of each source under ``mix``."""
    if not cfg.data.mix:
        return load(train_files)
    loaded = [load([Path(p) for p in source.train]) for source in cfg.data.mix]
    sizes = [len(examples) for examples, _ in loaded]
    counts = mix_counts(sizes, [s.weight for s in cfg.data.mix], [s.max_samples for s in cfg.data.mix])
    pairs = mix_index(sizes, counts, cfg.data.mix_seed)
    stats: dict = {}
    for _, part in loaded:
        for key, value in part.items():
            if isinstance(value, int):
                stats[key] = stats.get(key, 0) + value
    caches = {part.get("cache") for _, part in loaded}
    if caches - {None}:
        stats["cache"] = "hit" if caches == {"hit"} else "built"
    names = [f"data.mix[{i}] ({Path(s.train[0]).name})" for i, s in enumerate(cfg.data.mix)]
    stats["mix"] = proportions(pairs, names)
    log.info("training mix of %d examples: %s", len(pairs),
             ", ".join(f"{name} {share:.3f}" for name, share in stats["mix"].items()))
    return MixedDataset([examples for examples, _ in loaded], pairs), stats


def _stream_examples(paths: list[Path], validate: Callable[[dict], None], tokenize: Callable[[dict], dict | None],
                     data_cfg: DictConfig, stats: dict) -> Iterator[dict]:
    """Every valid record of ``paths`` (any format of trainer/data/sources.py) through ``tokenize``,
    streamed; ``stats`` is filled in as the stream is consumed."""
    drops = DropLog("length")
    for path in paths:
        stream = RecordStream(path, validate, data_cfg.on_bad_record)
        for where, record in stream:
            stats["records"] += 1
            try:
                example = tokenize(record)
            except TemplateError as err:
                if data_cfg.on_bad_record == "error":
                    raise DataError(f"{path}:{where}: {err}") from None
                log.warning("skipping bad record: %s:%s: %s", path, where, err)
                stats["skipped_bad"] += 1
                continue
            if example is None:
                drops.add(path, where, f"does not fit data.max_length={data_cfg.max_length} "
                                       f"(data.truncation={data_cfg.truncation})")
            else:
                yield example
        stats["skipped_bad"] += stream.skipped
    drops.log_summary()
    stats["dropped_length"] = drops.count


def tokenized_records(paths: list[Path], validate: Callable[[dict], None], tokenize: Callable[[dict], dict | None],
                      data_cfg: DictConfig, cache: dict | None = None,
                      topology: Topology | None = None) -> tuple[Sequence[dict], dict]:
    """Every valid record of ``paths`` through ``tokenize`` (None: it does not fit), and counts of what
    was dropped. A bad record, or one the chat template refuses, names ``file:line`` (``file:row N`` for
    Parquet / datasets directories) and stops the run or is skipped and counted
    (``data.on_bad_record``); the first records dropped for length are named too.

    With ``cache`` (``{"kind", "options", "tokenizer"}``) and a ``topology``, the examples come from the
    memory-mapped cache of trainer/data/cache.py: rank 0 builds it when missing or invalid, the other
    ranks wait and map it; the stats then also hold ``cache`` ("hit" or "built") and
    ``tokenized_ranks`` (how many ranks tokenised, summed over the world). Without, a list as before."""
    stats = {"records": 0, "skipped_bad": 0, "dropped_length": 0}
    if cache is None or topology is None:
        examples = list(_stream_examples(paths, validate, tokenize, data_cfg, stats))
        return examples, stats
    files = [f for p in paths for f in data_files_of(p)]
    key = cache_key(cache["kind"], cache.get("options", {}), files, cache["tokenizer"],
                    data_cfg.max_length, data_cfg.truncation)
    directory = Path(data_cfg.cache_dir) / "tokenized" / key
    built = 0
    if topology.is_main and open_cache(directory, key) is None:
        log.info("tokenising %s into %s", ", ".join(map(str, paths)), directory)
        build_cache(directory, _stream_examples(paths, validate, tokenize, data_cfg, stats), lambda: stats, key)
        built = 1
    topology.barrier()
    dataset = open_cache(directory, key)
    if dataset is None:
        raise RuntimeError(f"tokenised cache {directory} is missing or invalid after rank 0 built it "
                           "(data.cache_dir must be one filesystem every rank sees)")
    tokenised = built
    if topology.world_size > 1:
        tokenised = int(all_reduce_sum(torch.tensor(float(built)), None).item())
    # Only rank 0 builds, so the count says whether this run built the cache.
    dataset.stats.update(cache="built" if tokenised else "hit", tokenized_ranks=tokenised, cache_dir=str(directory))
    return dataset, dataset.stats


def tokenized_chat_dataset(paths: list[Path], tokenizer, data_cfg: DictConfig,
                           topology: Topology | None = None) -> tuple[Sequence[dict], dict]:
    """Every record of ``paths`` tokenised with its assistant mask, and counts of what was dropped
    (through the shared tokenised cache when ``topology`` is given)."""
    cache = {"kind": "chat", "tokenizer": tokenizer} if topology is not None else None
    return tokenized_records(paths, validate_chat_record, lambda record: tokenize_chat(
        tokenizer, record["messages"], data_cfg.max_length + 1, data_cfg.truncation), data_cfg, cache, topology)


def sharded_batches(items: list, batch_size: int, topology: Topology) -> Iterator[tuple[list[int], list]]:
    """This data-parallel rank's share of ``items`` (indices ``dp_rank::dp``) in batches of
    ``batch_size``: ``(indices, batch)`` pairs, the same number on every rank. A rank that has run out
    gets ``([], items[:1])``: it forwards that stand-in and discards the result, so collectives inside
    the forward (ZeRO-3 parameter gathers, tensor-parallel reductions) stay in step on every rank.
    Every sharded eval, reference and scoring pass iterates through this."""
    mine = list(range(topology.dp_rank, len(items), topology.dp))
    calls = math.ceil(math.ceil(len(items) / topology.dp) / batch_size)
    for c in range(calls):
        ids = mine[c * batch_size:(c + 1) * batch_size]
        yield ids, [items[i] for i in ids] if ids else items[:1]


def all_reduce_sum(value: torch.Tensor, group) -> torch.Tensor:
    """Sum over ``group`` in float64 (exact for token counts, steady for loss sums), on the CPU.

    The stages accumulate eval sums on the CPU; NCCL reduces only CUDA tensors, so on an NCCL group
    the value travels through the current CUDA device and comes back."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    value = value.detach().to(device=device, dtype=torch.float64, copy=True)
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value.cpu()


def all_reduce_sums(values: list[torch.Tensor], group) -> list[float]:
    """Several scalar sums over ``group`` in one collective (a step's metrics, counts and loss)."""
    stacked = all_reduce_sum(torch.stack([torch.as_tensor(v).detach().double().cpu() for v in values]), group)
    return stacked.tolist()


def from_main(value, topology: Topology):
    """``value`` as rank 0 has it, on every rank (one pickled broadcast over the world): for what a
    rank reads from its local disk when every rank must act on the same answer."""
    box = [value if topology.is_main else None]
    if topology.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def read_stage_result(directory: Path) -> dict | None:
    marker = directory / STAGE_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def write_stage_result(directory: Path, result: dict) -> None:
    write_text_atomic(directory / STAGE_MARKER, dumps(result, indent=2))


def save_config(cfg: DictConfig, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def maybe_inject_fault(step: int, stage: str | None = None, rank: int = 0) -> None:
    """Fault injection for tests, after step N (``N`` for any stage, or ``<stage>:N``):
    ``STAGECRAFT_FAULT_AFTER_STEP`` kills the process without any cleanup, as a crash would;
    ``STAGECRAFT_HANG_AFTER_STEP`` makes rank 1 hang; ``STAGECRAFT_SIGNAL_AFTER_STEP`` sends this process
    SIGTERM, as a scheduler would, for loops whose step boundaries a test cannot time from outside."""
    def matches(var: str) -> bool:
        return os.environ.get(var) in (str(step), f"{stage}:{step}")

    if matches("STAGECRAFT_HANG_AFTER_STEP") and rank == 1:
        while not signals.requested():  # hung until torchrun, seeing rank 0 fail, signals it
            time.sleep(0.1)
        os._exit(1)
    if matches("STAGECRAFT_SIGNAL_AFTER_STEP"):
        os.kill(os.getpid(), signal.SIGTERM)
    if matches("STAGECRAFT_FAULT_AFTER_STEP"):
        sys.stdout.flush()
        sys.stderr.flush()
        # A real failure takes the worker's helper processes down with it (the scheduler kills the
        # whole job); left running, they would hold its stdout open. megatron's checkpoint writer
        # keeps one (a multiprocessing manager).
        for child in multiprocessing.active_children():
            child.kill()
        os._exit(17)


def start(cfg: DictConfig, topology: Topology) -> tuple[Path, dict | None]:
    """The stage directory, and the stage's result when it already completed with this identity
    (checkpoint.resume=auto then skips it); otherwise rank 0 records the resolved config there.

    Rank 0 compares the stage's identity (config, model and data fingerprints) with the one recorded
    on disk; every rank raises the same :class:`Refused` when they differ (trainer/runtime/identity.py)."""
    signals.install(cfg.run.stop_signals)
    out = stage_dir(cfg)
    refusal = from_main(identity.check_stage(cfg, out) if topology.is_main else None, topology)
    if refusal is not None:
        raise Refused(refusal)
    finished = from_main(read_stage_result(out) if topology.is_main else None, topology)
    if finished is not None and cfg.checkpoint.resume == "auto":
        log.info("stage %s already complete in %s; skipping", cfg.stage.name, out)
        return out, finished
    if topology.is_main:
        save_config(cfg, out)
    return out, None


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def total_steps(stage: DictConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the stage: its epochs, capped by ``stage.max_steps`` when that is > 0."""
    steps = stage.epochs * steps_per_epoch
    return min(steps, stage.max_steps) if stage.max_steps > 0 else steps


def setup_strategy(cfg: DictConfig, topology: Topology, grad_accum: int, total: int,
                   make_model: Callable[[], torch.nn.Module]):
    """The stage's strategy wrapped around ``make_model()`` (built inside the strategy's model-init
    context, e.g. straight into ZeRO-3 partitions), with its optimizer and LR schedule."""
    stage = cfg.stage
    strategy = build_strategy(cfg.parallel, topology)
    with strategy.model_init_context(stage.micro_batch_size, grad_accum, cfg.model.path is not None):
        model = make_model()
    log.info("%s: %s, %.2fM parameters", stage.name, type(model).__name__, count_parameters(model) / 1e6)
    strategy.setup(model, stage.optim, stage.micro_batch_size, grad_accum, total)
    return strategy


def restore(cfg: DictConfig, topology: Topology, strategy, total: int) -> tuple[CheckpointManager, int, MetricsLogger]:
    """The stage's checkpoints, the step it starts from (the selected checkpoint loaded), its logger."""
    checkpoints = CheckpointManager(stage_dir(cfg) / "checkpoints", cfg.checkpoint.keep_last, topology,
                                    seed=cfg.run.seed)
    start_step = resume_step(cfg, checkpoints, strategy)
    # Created only now: metrics of steps after start_step are cut back once the checkpoint has loaded.
    logger = MetricsLogger(stage_dir(cfg), cfg, cfg.stage.name, total, start_step, enabled=topology.is_main)
    return checkpoints, start_step, logger


def resume_step(cfg: DictConfig, checkpoints: CheckpointManager, strategy) -> int:
    """The step to start from: 0, or the step of the checkpoint ``checkpoint.resume`` selects
    (model, optimizer, LR schedule and RNG restored)."""
    resume = cfg.checkpoint.resume
    if resume == "never":
        if checkpoints.latest() is not None:
            raise Refused(f"checkpoint.resume=never but {checkpoints.dir} already holds checkpoints; "
                          "use checkpoint.resume=auto to continue, or a new run.dir")
        return 0
    if resume == "auto":
        path = checkpoints.newest_verified()  # a newer one that fails verification is named and skipped
    else:
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise BadInput(f"checkpoint.resume: {path} is not a complete checkpoint (no {MARKER} marker)")
        problem = checkpoints.verify(path)
        if problem is not None:
            raise BadInput(f"checkpoint.resume: {path} cannot be resumed from: {problem}")
    if path is None:
        return 0
    client_state = checkpoints.load(strategy, path)
    log.info("resumed from %s at step %d", path, client_state["step"])
    return int(client_state["step"])


class BadSteps:
    """Counts steps whose loss or gradient norm was not finite. The strategy has already declined to
    apply such a step; after ``stage.max_bad_steps`` of them in a row (0: never) the stage stops with
    :class:`Diverged`, before it checkpoints or exports anything more."""

    def __init__(self, stage: DictConfig):
        self.limit = stage.max_bad_steps
        self.name = stage.name
        self.in_a_row = 0
        self.total = 0

    def update(self, step: int, info: dict, metrics: dict) -> None:
        """Count step ``step``; ``metrics`` (about to be logged) gains ``skipped`` and ``bad_steps``.
        Every rank sees the same ``info["skipped"]``: it comes from an already-reduced gradient norm."""
        bad = bool(info.get("skipped"))
        self.in_a_row = self.in_a_row + 1 if bad else 0
        self.total += bad
        self.step = step
        metrics.update(skipped=int(bad), bad_steps=self.total)
        if bad:
            log.warning("%s step %d: non-finite loss or gradient norm (loss %s, grad norm %s); update skipped "
                        "(%d in a row)",
                        self.name, step, metrics.get("loss"), metrics.get("grad_norm"), self.in_a_row)

    def raise_if_diverged(self) -> None:
        if self.limit and self.in_a_row >= self.limit:
            raise Diverged(f"stage {self.name} diverged: {self.in_a_row} consecutive steps up to step {self.step} had a "
                           f"non-finite loss or gradient norm (stage.max_bad_steps={self.limit}). Nothing was "
                           "exported; the last good checkpoint is kept. Lower stage.optim.lr, raise "
                           "stage.optim.warmup_steps, or check the data")


def after_step(cfg: DictConfig, topology: Topology, checkpoints: CheckpointManager, strategy, done: int,
               total: int, bad_steps: BadSteps) -> None:
    """End of step ``done`` (logged already): stop if it diverged, the periodic checkpoint (the final
    one is written by :func:`finish`), the fault-injection hook, then the stop-signal check: every rank
    agrees, and a stop checkpoints and raises Preempted."""
    bad_steps.raise_if_diverged()
    every = cfg.checkpoint.every_steps
    saved = False
    # Not during a run of bad steps: the newest checkpoint stays the one from before it.
    if every and done % every == 0 and done < total and not bad_steps.in_a_row:
        checkpoints.save(strategy, done, {"step": done})
        saved = True
    maybe_inject_fault(done, cfg.stage.name, topology.rank)
    if signals.agreed(topology.world_size, topology.device) and done < total:
        path = checkpoints.dir / checkpoints.tag(done) if saved else checkpoints.save(strategy, done, {"step": done})
        why = signals.requested() or "a stop signal on another rank"
        raise Preempted(f"stage {cfg.stage.name} stopped by {why} after step {done}/{total}; checkpoint {path}. "
                        "Rerun the same command to resume")


def finish(cfg: DictConfig, topology: Topology, strategy, checkpoints: CheckpointManager, tokenizer, logger,
           total: int, result: dict) -> dict:
    """Final checkpoint, HF export, the stage's COMPLETE.json. Collective."""
    bad = {k: v for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise Diverged(f"stage {cfg.stage.name}: non-finite results {bad}; nothing exported")
    latest = checkpoints.latest()
    if latest is None or latest.name != checkpoints.tag(total):
        checkpoints.save(strategy, total, {"step": total})
    out = stage_dir(cfg)
    if cfg.checkpoint.export_hf:
        export_hf(strategy, tokenizer, out / "hf", topology)
        result["hf"] = str(out / "hf")
    logger.close(result)  # rank 0 prints the stage's summary (trainer/logging/console.py)
    if topology.is_main:
        write_stage_result(out, result)
    topology.barrier()
    return result
