"""Shared helpers: run the real `stagecraft` command on a tiny model, in 1 or N processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# A model and data small enough for a 2-core machine; every stage test composes these.
TINY = [
    "model.config.hidden_size=64", "model.config.intermediate_size=128", "model.config.num_hidden_layers=2",
    "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2", "model.embedded_vocab_size=400",
    "data.synthetic.n_train=64", "data.synthetic.n_eval=16", "data.max_length=64",
    "stage.global_batch_size=8", "stage.optim.lr=3e-3", "stage.optim.warmup_steps=2",
    "logging.progress=false", "logging.wandb_mode=disabled",
]


# The stagecraft command with megatron-core's test-only CPU compat layer applied (run_stagecraft script=).
MEGATRON_CLI = Path(__file__).with_name("megatron_cli.py")

# Six steps with a checkpoint at step 3: long enough to see learning, resume and trajectories.
STEPS = ["stage.max_steps=6", "checkpoint.every_steps=3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def stagecraft_command(run_dir: Path, overrides: list[str], cache: Path, nproc: int = 1, env: dict | None = None,
                       script: Path | None = None, tiny: bool = True) -> tuple[list[str], dict]:
    """The command line and environment of `stagecraft run.dir=... <overrides>` (see run_stagecraft)."""
    # A model loaded from model.path has no model.config to shrink.
    tiny = [o for o in TINY if tiny and not ("model=hf" in overrides and o.startswith("model.config."))]
    # Hydra's own flags (--config-dir DIR, ...) go before the overrides, as a user types them.
    flags = [a for i, a in enumerate(overrides) if a.startswith("--") or (i and overrides[i - 1].startswith("--"))]
    args = [*flags, f"run.dir={run_dir}", *tiny, *[o for o in overrides if o not in flags]]
    if script is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(script), *args, f"cluster.nproc_per_node={nproc}",
               "hydra.output_subdir=null"]
    else:
        cmd = [sys.executable, "-m", "trainer.cli", *args]
        if nproc > 1:
            cmd += [f"cluster.nproc_per_node={nproc}"]  # the command picks a free port itself
    full_env = {**os.environ, "STAGECRAFT_CACHE": str(cache), "OMP_NUM_THREADS": "1", **(env or {})}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(var, None)
    return cmd, full_env


def run_stagecraft(run_dir: Path, overrides: list[str], cache: Path, nproc: int = 1, env: dict | None = None,
                   check: bool = True, script: Path | None = None, tiny: bool = True) -> subprocess.CompletedProcess:
    """`stagecraft run.dir=... <overrides>` as a user types it; nproc > 1 goes through its torchrun launch.

    ``tiny=False`` runs the configs as they are (the demo as a user runs it), not shrunk to ``TINY``.
    ``script``: a test-only entry point that patches something and then runs the same command (e.g.
    tests/megatron_cli.py); torchrun starts it directly, since the command's own launch would not."""
    cmd, full_env = stagecraft_command(run_dir, overrides, cache, nproc, env, script, tiny)
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"stagecraft failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def train_records(run_dir: Path, stage: str = "sft") -> list[dict]:
    path = Path(run_dir) / "stages" / stage / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def losses(run_dir: Path, stage: str = "sft") -> list[float]:
    return [r["loss"] for r in train_records(run_dir, stage)]


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache_dir) -> Path:
    """The 1-process run every layout is compared with: the whole global batch of 8 in one micro-batch."""
    run = tmp_path_factory.mktemp("ref")
    run_stagecraft(run, [*STEPS, "stage.micro_batch_size=8"], cache_dir)
    return run


def assert_series_close(a, b, tol: float = 1e-5) -> None:
    """Two per-step series (losses, grad norms, ...) of the same length, each entry within ``tol``."""
    assert len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b)), f"{a}\n{b}"


def assert_tensors_close(ref: dict, got: dict, tol: float, what: str = "weights") -> None:
    """Two name -> tensor dicts with the same names, every element within ``tol``."""
    assert sorted(ref) == sorted(got), what
    worst = max((ref[k].float() - got[k].float()).abs().max().item() for k in ref)
    assert worst <= tol, (what, worst)


def assert_same_export(ref: Path, got: Path, files: tuple[str, ...] = ("model.safetensors",),
                       tol: float = 1e-4) -> None:
    """Two hf/ exports hold the same tensors. After training, Adam amplifies float noise on near-zero
    gradients, so the default bound is looser than a loss bound."""
    from safetensors.torch import load_file

    for name in files:
        assert_tensors_close(load_file(str(Path(ref) / name)), load_file(str(Path(got) / name)), tol, name)


def user_recipe(root: Path, name: str, recipe: dict) -> list[str]:
    """``recipe`` written as a user's recipe YAML in ``<root>/conf/recipe/<name>.yaml``; returns the
    command-line arguments that select it (``--config-dir <root>/conf recipe=<name>``)."""
    import yaml

    conf = Path(root) / "conf" / "recipe"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / f"{name}.yaml").write_text("# @package _global_\n" + yaml.safe_dump(recipe))
    return ["--config-dir", str(conf.parent), f"recipe={name}"]
