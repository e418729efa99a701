"""The typed configuration schema.

Every YAML under ``configs/`` is merged onto these dataclasses, registered in Hydra's ConfigStore as
``stagecraft_schema``, so a misspelt key or a value of the wrong type fails at composition time with
OmegaConf's own message naming the key. Cross-field rules (``tp*pp*dp == world``, batch divisibility,
enum-like strings) are checked by :func:`trainer.config.validate.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class RunConfig:
    name: str = "sft-demo"
    # Rerunning a command with the same run.dir resumes it (checkpoint.resume=auto). run_id hashes the
    # config keys that change results (trainer/runtime/identity.py), so a different job gets its own
    # directory by default.
    dir: str = "runs/${run.name}-${run_id:}"
    seed: int = 1234
    # Signals that stop the run at the next step boundary with a checkpoint and exit code 75 (slurm
    # sends SIGTERM, or the signal named in `--signal`, before the time limit).
    stop_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class ModelConfig:
    # A local Hugging Face checkpoint directory; when null, a model is built from `arch` + `config`
    # with random init (the embedded default). Nothing is ever downloaded.
    path: Optional[str] = None
    # Tokenizer directory; defaults to `path`. With neither, the embedded SentencePiece tokenizer.
    tokenizer: Optional[str] = None
    arch: str = "llama"
    # Keyword arguments for transformers.AutoConfig.for_model(arch, ...) when building from config.
    config: Dict[str, Any] = field(default_factory=dict)
    # Vocabulary of the embedded SentencePiece tokenizer (ignored when a tokenizer path is given).
    embedded_vocab_size: int = 512
    # What the embedded tokenizer is trained on: "tasks" (the synthetic task families), or "longwriter"
    # (those plus LongWriter-style English prose, so its words are whole tokens; see configs/recipe/longwriter.yaml).
    embedded_corpus: str = "tasks"
    attn_implementation: str = "sdpa"


@dataclass
class SyntheticDataConfig:
    families: List[str] = field(default_factory=lambda: ["reverse", "sort", "count", "code_expr"])
    n_train: int = 2048
    n_eval: int = 128
    seed: int = 0


@dataclass
class MixSourceConfig:
    """One source of ``data.mix`` (trainer/data/mixing.py)."""
    train: List[str] = field(default_factory=list)
    weight: float = 1.0
    max_samples: int = -1  # cap on the examples drawn from this source; -1: none


@dataclass
class DataConfig:
    # JSONL files (chat format, see docs/data.md). Empty: the project's synthetic generator writes
    # them under <run.dir>/data/.
    train: List[str] = field(default_factory=list)
    eval: List[str] = field(default_factory=list)
    # Weighted sources instead of data.train: the largest weight used whole, the others in proportion
    # to it, drawn by run.seed by index over each source's tokenised cache, never written out as a
    # mixed file (trainer/data/mixing.py; docs/data.md). The realised shares are in train_data.mix.
    mix: List[MixSourceConfig] = field(default_factory=list)
    mix_seed: int = "${run.seed}"  # type: ignore[assignment]  # an interpolation, resolved to an int
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    max_length: int = 128
    truncation: str = "right"  # right | left | drop
    on_bad_record: str = "error"  # error | skip
    # Shared cache for trained tokenizers (safe for concurrent processes).
    cache_dir: str = "${oc.env:STAGECRAFT_CACHE,${oc.env:HOME,.}/.cache/stagecraft}"


@dataclass
class ParallelConfig:
    strategy: str = "deepspeed"  # deepspeed | megatron
    tp: int = 1
    pp: int = 1
    cp: int = 1
    # -1: whatever is left of the world size after tp*pp*cp.
    dp: int = -1
    # megatron strategy only: interleaved pipeline stages per rank, sequence parallel (needs
    # Transformer Engine norms), megatron's distributed (ZeRO-1-style) optimizer.
    virtual_pp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16
    offload_optimizer: bool = False
    activation_checkpointing: bool = False
    # Chunked LM head (deepspeed strategy): per-token log-probs are computed this many tokens at a
    # time from the final hidden states, only where loss_mask is non-zero, so full-vocabulary logits
    # never exist for a whole micro-batch (trainer/losses/chunked.py; 512 measured as fast as or faster
    # than 256 and 1024 at vocabularies of 4k and 32k on CPU, docs/performance.md). 0: full logits.
    # Ignored with parallel.tp > 1 (AutoTP), by megatron (vocab-parallel logits) and for models that
    # transform the head's output (soft-capping).
    logits_chunk_tokens: int = 512
    # Packed and prompt-shared rows (deepspeed strategy, sdpa attention): one causal attention call per
    # sequence or pair part instead of one call with a [rows, 1, L, L] mask, which scores every key of a
    # row (trainer/models/segment_attention.py). Models with sliding windows or soft-capping keep the mask.
    segment_attention: bool = True
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # auto | gloo | nccl
    # How long a collective may wait for the other ranks before the run fails with exit code 5 (a rank
    # hung or died). Fractions allowed.
    timeout_minutes: float = 30.0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1


@dataclass
class StageConfig:
    type: str = "sft"
    name: str = "sft"
    epochs: int = 1
    # > 0 caps the number of optimizer steps (the LR schedule is laid over the capped length).
    max_steps: int = -1
    global_batch_size: int = 16
    micro_batch_size: int = 4
    # token: LongWriter long-ce, token NLL summed over the global batch / its target-token count.
    # sample: mean over sequences of each sequence's token-mean NLL.
    loss_reduction: str = "token"
    neftune_alpha: float = 0.0
    # Pack several sequences into each row of a micro-batch (attention kept within each sequence):
    # same losses, less padding. null (auto): on where the strategy supports it (deepspeed), off
    # with megatron (no per-sequence attention mask there); the reward stage always pads.
    packing: Optional[bool] = None
    eval_every: int = 0
    # Consecutive steps with a non-finite loss or gradient norm (each skipped, not applied) after which
    # the stage stops with exit code 3, keeping its last good checkpoint and exporting nothing.
    max_bad_steps: int = 3
    # Greedy-generation accuracy on the eval split at the end of the stage (0 new tokens: off).
    eval_max_new_tokens: int = 24
    optim: OptimConfig = field(default_factory=OptimConfig)


HELPSTEER2 = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]


@dataclass
class PreferenceStageConfig(StageConfig):
    """DPO / IPO / RPO: L = preference_weight * mean(L_pref) + sft_weight * mean(NLL(chosen))."""

    type: str = "preference"
    loss: str = "dpo"  # dpo | ipo | rpo
    beta: float = 0.1
    eta: float = 1.0  # rpo: scale of the reward gap
    rpo_distance: str = "bwd_kl"  # bwd_kl | fwd_kl | sq
    preference_weight: float = 1.0
    sft_weight: float = 0.0
    # false: sequence log-probs are sums over response tokens (what DPO/RPO's beta assumes);
    # true: per-token averages.
    average_logps: bool = False
    # HF directory of the reference model; null: the policy's starting model (model.path / built model).
    reference: Optional[str] = None
    # cached: one reference forward over the data before training, stored on disk and reused;
    # online: keep the reference model and run it every step.
    reference_mode: str = "cached"
    # Prompt sharing (trainer/data/prefix_sharing.py): prompt, chosen and rejected in one row, the prompt
    # computed once, for the policy and the reference. null (auto): on with deepspeed, off with megatron.
    # When on it replaces stage.packing's layout (its rows are packed too).
    prefix_sharing: Optional[bool] = None


@dataclass
class RewardStageConfig(StageConfig):
    """Multi-attribute regression reward model on a CausalLM backbone."""

    type: str = "reward"
    attributes: List[str] = field(default_factory=lambda: list(HELPSTEER2))
    # Weights that turn attribute scores into one scalar reward (saved with the model).
    attribute_weights: List[float] = field(default_factory=lambda: [1.0, 0.0, 0.0, 0.0, 0.0])


@dataclass
class AnnotateStageConfig(StageConfig):
    """Score a preference file's chosen / rejected responses with a reward model."""

    type: str = "annotate"
    reward_model: Optional[str] = None  # a reward stage's hf/ export
    output: Optional[str] = None  # default: <run.dir>/stages/<name>/annotated.jsonl
    # false: pairs that arrive with rewards (ground truth, e.g. a verifier) keep them.
    overwrite_rewards: bool = False


@dataclass
class CurateStageConfig(StageConfig):
    """A data-curation tool over the stage's data (trainer/curation; docs/curation.md): its kept records
    are the stage's dataset, for later stages to train on."""

    type: str = "curate"
    tool: str = "???"  # length-filter | reward-filter | dedup | select
    reward_model: Optional[str] = None  # reward-filter: a reward stage's hf/ export
    # The tool's options, named as its CLI flags with _ for - (e.g. {threshold: 80}). reward-filter's
    # reward_model comes from the recipe stage's reward_model.
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchmarkStageConfig(StageConfig):
    """Training throughput and memory: timed optimizer steps on random full-length sequences."""

    type: str = "benchmark"
    seq_length: int = 2048
    vocab_size: int = 32000  # of a model built from model.config (a model.path model keeps its own)
    untimed_steps: int = 3  # warm-up: allocator, kernels, compilation
    timed_steps: int = 10
    # Dense peak of one device in TFLOP/s at the run's precision (H100 SXM bf16: 989); MFU divides by it.
    peak_tflops: float = 989.0


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end of the stage
    keep_last: int = 2
    resume: str = "auto"  # auto | never | <path to a checkpoint directory>
    export_hf: bool = True
    # A stage directory made with a different config (trainer/runtime/identity.py): refuse (exit 4),
    # restart the stage (the old directory is kept, renamed) or resume from its checkpoints anyway.
    on_change: str = "refuse"  # refuse | restart | resume


@dataclass
class ClusterConfig:
    """Where the workers run (docs/launch.md). ``launcher``: ``local`` runs on this machine (torchrun
    when the world is > 1; with ``nnodes`` > 1, start the same command on every node with its own
    ``node_rank``); ``slurm`` writes ``<run.dir>/slurm/job.sbatch`` and submits it; ``srun`` is what
    that job runs on each node: nnodes, node_rank and master_addr come from SLURM_NNODES,
    SLURM_NODEID and the first host of SLURM_JOB_NODELIST."""

    launcher: str = "local"  # local | slurm | srun
    # Workers per node; > 1 makes the `stagecraft` command start torchrun itself. Under slurm also the
    # GPUs requested per node (none with parallel.device=cpu).
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    # 0: a free port picked at launch (several jobs on one machine); a multi-node run needs a fixed
    # one (under slurm, 0 means 20000 + SLURM_JOB_ID % 10000, the same on every node of the job).
    master_port: int = 0
    # Seconds torchrun gives its workers to checkpoint and exit after it forwards a stop signal.
    shutdown_timeout: int = 300
    # launcher=slurm: sbatch options. null: not passed (the cluster's default).
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "04:00:00"
    cpus_per_task: Optional[int] = None
    job_name: Optional[str] = None  # null: run.name
    output: Optional[str] = None  # null: <run.dir>/slurm/%j.out (a sweep: <sweep dir>/slurm/%A_%a.out)
    # `--signal`: sent to every task this long before the time limit; must be one of run.stop_signals
    # so the run checkpoints and exits 75, and the job requeues itself.
    signal: str = "USR1@300"
    requeue: bool = True
    sbatch_lines: List[str] = field(default_factory=list)  # extra options, e.g. ["--qos=high", "--exclusive"]
    setup: List[str] = field(default_factory=list)  # shell lines before srun: module load, source venv
    srun_args: List[str] = field(default_factory=list)  # e.g. ["--container-image=..."] (pyxis)
    # How each node runs stagecraft inside the job; null: this Python, `<sys.executable> -m trainer.cli`.
    command: Optional[str] = None
    dry_run: bool = False  # print the sbatch script instead of submitting it


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "stagecraft"
    entity: Optional[str] = None
    progress: bool = True
    log_every: int = 1


@dataclass
class DataSourceConfig:
    """A named data source of a recipe: JSONL files, or the synthetic generator for some task families."""

    kind: str = "sft"  # sft | preference | reward: the record format
    train: List[str] = field(default_factory=list)
    eval: List[str] = field(default_factory=list)
    families: List[str] = field(default_factory=list)  # synthetic: task families (when train is empty)
    n_train: int = 1024
    n_eval: int = 64
    seed: int = 0
    # synthetic chat data without task families: "longwriter" writes LongWriter-style long-output
    # records (trainer/curation/longwriter_data.py), `options` its arguments (p_truncated, ...).
    generator: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MixConfig:
    source: str = "???"
    weight: float = 1.0


@dataclass
class RecipeStageConfig:
    name: str = "???"
    stage: str = "sft"  # a file of configs/stage/ the stage starts from
    # Keys of that stage config to change, e.g. {epochs: 3, optim: {lr: 3e-7}}.
    overrides: Dict[str, Any] = field(default_factory=dict)
    # Weighted data sources; the largest weight's source is used whole, the others are sampled to
    # their share of it (e.g. 0.98 general + 0.02 code: 2 % code replay).
    data: List[MixConfig] = field(default_factory=list)
    # Where the policy starts: `previous` (the newest policy before it), `base` (the recipe's model), a
    # stage name, or a path. Iteration k of a repeated stage starts from iteration k-1.
    init: str = "previous"
    # Preference stages: the reference model, same choices as `init`.
    reference: str = "previous"
    # A reward stage (or a reward-model path). Annotate stages score with it; a preference stage with
    # it scores its own training pairs first (an `<name>_annotate` stage is planned before it).
    reward_model: Optional[str] = None
    repeat: int = 1
    # GGUF files written from the stage's export once it completes (policy stages), beside its hf/:
    # any of f16, bf16, q8_0, q4_k_m (the last needs llama.cpp), e.g. [q8_0].
    gguf: List[str] = field(default_factory=list)


@dataclass
class RecipeEvalConfig:
    enabled: bool = True
    # Sources whose eval split is measured after every stage: generation accuracy for sft sources,
    # preference ranking accuracy for preference sources.
    sources: List[str] = field(default_factory=list)
    max_new_tokens: int = 24
    batch_size: int = 16
    # Chat sources of `sources` scored by LongWriter's length following (S_l of greedy generations,
    # docs/evaluation.md) instead of task accuracy, generating up to `length_max_new_tokens`.
    length_following: List[str] = field(default_factory=list)
    length_max_new_tokens: int = 1024


@dataclass
class ClaimConfig:
    """An effect the recipe claims, checked against measured numbers in the report (never assumed)."""

    description: str = "???"
    metric: str = "???"  # an eval metric, e.g. code/accuracy
    stage: str = "???"  # measured after this stage ...
    baseline: str = "base"  # ... against this one (base: the starting model) ...
    threshold: Optional[float] = None  # ... or, when set, against this constant (e.g. 0.5: chance)
    expect: str = "higher"  # higher | close
    tolerance: float = 0.05  # close: |stage - baseline| <= tolerance


@dataclass
class RecipeConfig:
    name: str = "???"
    sources: Dict[str, DataSourceConfig] = field(default_factory=dict)
    stages: List[RecipeStageConfig] = field(default_factory=list)
    eval: RecipeEvalConfig = field(default_factory=RecipeEvalConfig)
    claims: List[ClaimConfig] = field(default_factory=list)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # null: run the one `stage`; set (`recipe=demo`): run the recipe's stages in order.
    recipe: Optional[RecipeConfig] = None


def register_configs() -> None:
    """Register the schema so `configs/config.yaml` can name it first in its defaults list."""
    from omegaconf import OmegaConf

    from trainer.runtime.identity import run_id

    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", run_id)
    cs = ConfigStore.instance()
    cs.store(name="stagecraft_schema", node=Config)
    # A stage YAML names its type's schema first in its defaults (e.g. `- preference_schema`).
    from trainer.stages.registry import STAGE_TYPES

    for name, kind in STAGE_TYPES.items():
        if name != "sft":
            cs.store(group="stage", name=f"{name}_schema", node=kind.schema)
