"""Faults injected into checkpoints, the run.dir lock and stage identity, in-process (no workers).

The CLI-level counterparts (tests/test_faults.py) run the same faults through `stagecraft`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.test_components import _FakeStrategy, _topology
from trainer.checkpoint.manager import MANIFEST, MARKER, CheckpointManager
from trainer.config import CONFIG_DIR, register_configs
from trainer.runtime.errors import CheckpointWriteError, Refused, RunError
from trainer.runtime.identity import IDENTITY, check_stage, run_id
from trainer.runtime.lock import RunLock


def _manager(tmp_path, steps=(2, 4, 6)) -> CheckpointManager:
    manager = CheckpointManager(tmp_path / "ckpt", 10, _topology())
    for step in steps:
        manager.save(_FakeStrategy(), step, {"step": step})
    return manager


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-3])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated shard": (lambda p: _truncate(p / "state.json"), "state.json has"),
    "flipped byte": (lambda p: _flip(p / "state.json"), "state.json does not match its checksum"),
    "deleted rng": (lambda p: (p / "rng_rank0.pt").unlink(), "rng_rank0.pt is missing"),
    "garbage marker": (lambda p: (p / MARKER).write_text("{not json"), "marker is unreadable"),
    "garbage manifest": (lambda p: (p / MANIFEST).write_text("[]"), "manifest.json is unreadable"),
}


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    manager = _manager(tmp_path, steps=(2,))
    files = json.loads((manager.dir / "step_000002" / MANIFEST).read_text())["files"]
    assert sorted(files) == ["rng_rank0.pt", "state.json"]
    assert files["state.json"]["size"] == (manager.dir / "step_000002" / "state.json").stat().st_size
    assert len(files["state.json"]["sha256"]) == 64
    assert manager.verify(manager.dir / "step_000002") is None


@pytest.mark.parametrize("fault", sorted(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_is_named_and_skipped(tmp_path, caplog, fault):
    manager = _manager(tmp_path)
    corrupt, reason = CORRUPTIONS[fault]
    corrupt(manager.dir / "step_000006")
    assert reason in manager.verify(manager.dir / "step_000006")
    with caplog.at_level(logging.WARNING):
        assert manager.newest_verified() == manager.dir / "step_000004"
    assert "step_000006" in caplog.text and reason in caplog.text


def test_no_verifiable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    manager = _manager(tmp_path, steps=(2, 4))
    for tag in ("step_000002", "step_000004"):
        (manager.dir / tag / "rng_rank0.pt").unlink()
    with pytest.raises(RunError, match="no checkpoint .* can be resumed from.*step_000004.*step_000002"):
        manager.newest_verified()
    assert CheckpointManager(tmp_path / "none", 2, _topology()).newest_verified() is None


def test_pruning_removes_the_marker_first(tmp_path, monkeypatch):
    """Killed half-way through deleting an old checkpoint: what is left is not a checkpoint."""
    manager = _manager(tmp_path, steps=(2, 4))
    manager.keep_last = 2

    rmtree = shutil.rmtree

    def killed(path, ignore_errors=False):
        if Path(path).name == "step_000002":
            raise KeyboardInterrupt("killed while deleting")
        rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr("trainer.checkpoint.manager.shutil.rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        manager.save(_FakeStrategy(), 6, {"step": 6})
    monkeypatch.undo()
    assert (manager.dir / "step_000002").is_dir() and not (manager.dir / "step_000002" / MARKER).exists()
    assert manager.complete_tags() == ["step_000004", "step_000006"]


class _FullDisk(_FakeStrategy):
    def save(self, ckpt_dir, tag, client_state):
        (Path(ckpt_dir) / tag).mkdir(parents=True, exist_ok=True)
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(ckpt_dir) / tag / "state.json"))


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    manager = _manager(tmp_path, steps=(2,))
    with pytest.raises(CheckpointWriteError) as err:
        manager.save(_FullDisk(), 4, {"step": 4})
    message = str(err.value)
    assert "no space left on device writing checkpoint" in message and "step_000004.partial" in message
    assert "the latest checkpoint is still" in message and "step_000002" in message
    assert manager.complete_tags() == ["step_000002"] and not list(manager.dir.glob("*.partial"))
    assert manager.verify(manager.dir / "step_000002") is None


def test_run_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path, caplog):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(Refused, match=f"in use by pid {os.getpid()} on "):
        RunLock(tmp_path).acquire()
    first.release()
    # A holder that died without releasing: its record is still in the file, nobody holds the flock.
    (tmp_path / ".lock").write_text(json.dumps({"host": "node7", "pid": 999999, "since": "2026-01-01T00:00:00"}))
    with caplog.at_level(logging.WARNING):
        RunLock(tmp_path).acquire().release()
    assert "taking over the lock of pid 999999 on node7" in caplog.text


# ---- stage identity ----------------------------------------------------------------------------------
def _cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_default_run_dir_differs_exactly_when_results_can():
    base = _cfg()
    assert str(base.run.dir) == f"runs/sft-demo-{run_id(_root_=base)}"
    same = {_cfg(o).run.dir for o in ("logging.wandb_mode=disabled", "checkpoint.every_steps=5",
                                      "parallel.zero_stage=2", "cluster.nproc_per_node=2")}
    assert same == {base.run.dir}
    different = {_cfg(o).run.dir for o in ("stage.optim.lr=1e-2", "model.path=/models/a", "run.seed=1",
                                           "data.synthetic.n_train=10", "parallel.precision=bf16")}
    assert len(different) == 5 and base.run.dir not in different


def _stage_cfg(tmp_path, data: Path, *overrides: str):
    cfg = _cfg(f"run.dir={tmp_path / 'run'}", f"data.train=[{data}]", *overrides)
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def test_a_changed_config_or_data_file_is_refused_with_the_keys_that_changed(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    stage = tmp_path / "run/stages/sft"
    assert check_stage(_stage_cfg(tmp_path, data), stage) is None
    recorded = (stage / IDENTITY).read_text()
    assert check_stage(_stage_cfg(tmp_path, data, "logging.progress=false"), stage) is None  # not a result key
    refusal = check_stage(_stage_cfg(tmp_path, data, "stage.optim.lr=0.5", "stage.global_batch_size=32"), stage)
    assert "stage.optim.lr: 0.001 -> 0.5" in refusal and "stage.global_batch_size: 16 -> 32" in refusal
    assert "checkpoint.on_change=restart" in refusal and "new run.dir" in refusal
    assert (stage / IDENTITY).read_text() == recorded  # a refusal changes nothing on disk
    data.write_text(data.read_text() * 2)
    assert "data.train[0]#content" in check_stage(_stage_cfg(tmp_path, data), stage)


def test_on_change_restart_keeps_the_old_stage_and_resume_goes_on(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    stage = tmp_path / "run/stages/sft"
    check_stage(_stage_cfg(tmp_path, data), stage)
    (stage / "metrics.jsonl").write_text("{}\n")
    assert check_stage(_stage_cfg(tmp_path, data, "stage.optim.lr=0.5", "checkpoint.on_change=resume"), stage) is None
    assert (stage / "metrics.jsonl").is_file()
    assert check_stage(_stage_cfg(tmp_path, data, "stage.optim.lr=0.7", "checkpoint.on_change=restart"), stage) is None
    aside = [p for p in stage.parent.iterdir() if p.name.startswith("sft.replaced-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").is_file() and not (stage / "metrics.jsonl").exists()
    shutil.rmtree(stage.parent)
