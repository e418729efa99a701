"""Faults injected into real runs of the `stagecraft` command, as a user or an operator meets them.

Each test checks the exit code (trainer/runtime/errors.py), the message, and what is left on disk.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import STEPS, losses, run_stagecraft, stagecraft_command, train_records
from trainer.checkpoint.manager import MARKER, CheckpointManager
from tests.test_components import _topology

pytestmark = pytest.mark.distributed
ONE_BATCH = ["stage.micro_batch_size=8"]  # the session `reference` run's layout: one micro-batch of 8


def _log(proc) -> str:
    """What the command printed (its log goes to stdout, Python warnings and tracebacks to stderr)."""
    return proc.stdout + proc.stderr


def _strict_json(path: Path) -> list:
    """Every JSON document in ``path`` (one, or one a line), parsed strictly: no NaN / Infinity."""
    def refuse(token):
        raise AssertionError(f"{path}: bare {token} is not JSON")

    text = path.read_text()
    lines = text.splitlines() if path.suffix == ".jsonl" else [text]
    return [json.loads(line, parse_constant=refuse) for line in lines if line.strip()]


@pytest.mark.parametrize("parallel", ["single", "zero2"])
def test_a_diverging_run_skips_bad_steps_then_stops_without_exporting(tmp_path, cache_dir, parallel):
    """lr=1e30 without warm-up: the first update takes the weights to ~1e30, where the forward
    overflows, so every later loss and gradient is NaN (on the plain fp32 path, which stagecraft
    guards itself, and under ZeRO's own overflow check)."""
    proc = run_stagecraft(tmp_path, [*ONE_BATCH, f"parallel={parallel}", "stage.optim.lr=1e30",
                                     "stage.optim.warmup_steps=0", "stage.max_steps=8", "checkpoint.every_steps=1",
                                     "checkpoint.keep_last=10"], cache_dir, check=False)
    assert proc.returncode == 3, _log(proc)[-3000:]
    stage = tmp_path / "stages/sft"
    records = _strict_json(stage / "metrics.jsonl")
    first_bad = next(r["step"] for r in records if r["skipped"])
    last = first_bad + 2  # stage.max_bad_steps=3 in a row
    assert [r["step"] for r in records] == list(range(1, last + 1))
    assert [r["skipped"] for r in records] == [0] * (first_bad - 1) + [1, 1, 1] and records[-1]["bad_steps"] == 3
    assert all(r["grad_norm"] in ("nan", "inf") for r in records[first_bad - 1:])
    assert f"diverged: 3 consecutive steps up to step {last}" in _log(proc)
    for step in range(first_bad, last + 1):
        assert f"step {step}: non-finite loss or gradient norm" in _log(proc)
    assert not (stage / "COMPLETE.json").exists() and not (stage / "hf").exists()
    # The newest checkpoint is the last one before the bad steps, and it verifies.
    manager = CheckpointManager(stage / "checkpoints", 10, _topology())
    assert manager.complete_tags() == [f"step_{s:06d}" for s in range(1, first_bad)]
    assert manager.verify(manager.dir / manager.complete_tags()[-1]) is None
    for path in [*tmp_path.rglob("*.json"), *tmp_path.rglob("*.jsonl")]:
        _strict_json(path)


def test_resume_skips_corrupt_checkpoints_and_a_stale_lock(reference, tmp_path, cache_dir):
    """Killed after step 5 with a checkpoint after every step; then four of the five are damaged in
    four ways, and the lock of a job that died is left behind. The rerun names each problem, resumes
    from the one intact checkpoint and reproduces the uninterrupted run exactly."""
    overrides = [*STEPS, *ONE_BATCH, "checkpoint.every_steps=1", "checkpoint.keep_last=10"]
    killed = run_stagecraft(tmp_path, overrides, cache_dir, env={"STAGECRAFT_FAULT_AFTER_STEP": "5"}, check=False)
    assert killed.returncode == 17
    ckpt = tmp_path / "stages/sft/checkpoints"
    states = "mp_rank_00_model_states.pt"  # ZeRO-0: weights and optimizer state in one file
    (ckpt / "step_000005" / MARKER).write_text("\x00garbage")
    truncated = ckpt / "step_000004" / states
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    flipped = ckpt / "step_000003" / states
    flipped.write_bytes(bytes(b ^ 0xFF if i == 1000 else b for i, b in enumerate(flipped.read_bytes())))
    (ckpt / "step_000002" / "rng_rank0.pt").unlink()
    (tmp_path / ".lock").write_text(json.dumps({"host": "node3", "pid": 4242, "since": "2026-12-01T00:00:00"}))

    proc = run_stagecraft(tmp_path, overrides, cache_dir)
    log = _log(proc)
    assert "taking over the lock of pid 4242 on node3" in log
    assert "step_000005 is unusable: its COMPLETE marker is unreadable" in log
    assert f"step_000004 is unusable: {states} has" in log
    assert f"step_000003 is unusable: {states} does not match its checksum" in log
    assert "step_000002 is unusable: rng_rank0.pt is missing" in log
    assert "resumed from" in log and "step_000001" in log
    assert [r["step"] for r in train_records(tmp_path)] == list(range(1, 7))
    assert losses(tmp_path) == losses(reference)

    # The same run.dir with a config that trains differently: refused, nothing touched.
    before = (tmp_path / "stages/sft/metrics.jsonl").read_text()
    changed = run_stagecraft(tmp_path, [*overrides, "stage.optim.lr=1e-2"], cache_dir, check=False)
    assert changed.returncode == 4
    assert "stage.optim.lr: 0.003 -> 0.01" in _log(changed) and "checkpoint.on_change=restart" in _log(changed)
    assert (tmp_path / "stages/sft/metrics.jsonl").read_text() == before
    assert json.loads((tmp_path / "exit.json").read_text())["code"] == 4


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _interrupt(cmd: list[str], env: dict, metrics: Path, after_lines: int, sig: int) -> tuple[int, str, list]:
    """Start the command, wait until ``metrics`` has ``after_lines`` lines, send ``sig`` to the command
    (the launcher); its exit code, its output, and the processes it had started."""
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= after_lines):
        assert launcher.poll() is None and time.monotonic() < deadline, "".join(launcher.communicate())[-3000:]
        time.sleep(0.02)
    children = psutil.Process(launcher.pid).children(recursive=True)
    assert len(children) >= 3  # torchrun and its two workers
    launcher.send_signal(sig)
    log = "".join(launcher.communicate(timeout=300))
    for child in children:  # what the launcher left behind finishes on its own, promptly
        try:
            child.wait(timeout=120)
        except psutil.NoSuchProcess:
            pass
    return launcher.returncode, log, children


def test_signals_to_the_launcher_checkpoint_every_rank_and_a_rerun_resumes(tmp_path, cache_dir):
    """2 workers under the command's own torchrun, 24 steps. (1) kill -9 of the launcher: torchrun
    dies with it (parent-death signal), passes SIGTERM to the workers, and they stop at one step
    boundary with a checkpoint; no process is left. (2) SIGTERM to the launcher of the rerun: the same,
    and the command exits 75. (3) The same command finishes the run with the uninterrupted run's
    losses."""
    overrides = ["stage.epochs=3", "parallel=zero2", "stage.micro_batch_size=2", "checkpoint.every_steps=10"]
    run = tmp_path / "preempted"
    cmd, env = stagecraft_command(run, overrides, cache_dir, nproc=2)
    metrics = run / "stages/sft/metrics.jsonl"
    checkpoint = run / "stages/sft/checkpoints/latest"

    code, _, children = _interrupt(cmd, env, metrics, 2, signal.SIGKILL)
    assert code == -signal.SIGKILL and not [p for p in children if _alive(p)]
    first = train_records(run)[-1]["step"]
    assert 2 <= first < 24 and checkpoint.read_text() == f"step_{first:06d}"
    assert json.loads((run / "exit.json").read_text())["code"] == 75

    code, log, children = _interrupt(cmd, env, metrics, first + 2, signal.SIGTERM)
    assert code == 75, log[-3000:]
    second = train_records(run)[-1]["step"]
    assert first < second < 24 and checkpoint.read_text() == f"step_{second:06d}"
    assert f"stopped by SIGTERM after step {second}/24" in log and "Rerun the same command to resume" in log
    assert not [p for p in children if _alive(p)]

    run_stagecraft(run, overrides, cache_dir, nproc=2)
    assert [r["step"] for r in train_records(run)] == list(range(1, 25))
    uninterrupted = tmp_path / "uninterrupted"
    run_stagecraft(uninterrupted, ["stage.epochs=3", *ONE_BATCH, "checkpoint.every_steps=10"], cache_dir)
    got, want = losses(run), losses(uninterrupted)
    assert len(got) == len(want) == 24 and max(abs(a - b) for a, b in zip(got, want)) <= 1e-5


def test_a_hung_rank_fails_the_run_naming_the_rank_and_the_collective(tmp_path, cache_dir):
    proc = run_stagecraft(tmp_path, [*STEPS, "parallel=zero2", "stage.micro_batch_size=2",
                                     "parallel.timeout_minutes=0.1", "cluster.shutdown_timeout=2"],
                          cache_dir, nproc=2, env={"STAGECRAFT_HANG_AFTER_STEP": "2"}, check=False)
    assert proc.returncode == 5, _log(proc)[-3000:]
    assert "rank 0: all_reduce called from signals.py" in _log(proc)
    assert "timed out after 0.1 min (parallel.timeout_minutes)" in _log(proc)


def test_a_full_disk_during_a_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, cache_dir):
    """A real ENOSPC: the checkpoint directory is a 2 MiB tmpfs (one checkpoint is ~1.5 MiB) in a
    private mount namespace."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare (a private mount namespace) to mount a small tmpfs")
    ckpt = tmp_path / "stages/sft/checkpoints"
    ckpt.mkdir(parents=True)
    cmd, env = stagecraft_command(tmp_path, [*STEPS, *ONE_BATCH], cache_dir)
    script = f'mount -t tmpfs -o size=2m tmpfs "{ckpt}" && exec "$@"'
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *cmd], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 6, _log(proc)[-3000:]
    assert f"no space left on device writing checkpoint {ckpt}/step_000006.partial" in _log(proc)
    assert "the latest checkpoint is still" in _log(proc) and "step_000003" in _log(proc)


def test_bad_input_is_one_error_before_any_worker_starts(tmp_path, cache_dir):
    layout = run_stagecraft(tmp_path, ["parallel.tp=2"], cache_dir, nproc=3, check=False)
    assert layout.returncode == 2
    assert _log(layout).count("parallel.tp*pp*cp = 2*1*1 = 2 does not divide the world size 3") == 1
    assert "launching" not in _log(layout)
    missing = run_stagecraft(tmp_path, ["model=hf", f"model.path={tmp_path / 'no-such-model'}"], cache_dir,
                             check=False)
    assert missing.returncode == 2 and f"model.path: {tmp_path / 'no-such-model'}" in _log(missing)
    assert "Traceback" not in _log(missing) + _log(layout)


def test_invalid_utf8_names_the_file_and_line(tmp_path, cache_dir):
    data = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    data.write_bytes((good + "\n").encode() * 3 + b'{"messages": "\xff\xfe"}\n')
    proc = run_stagecraft(tmp_path / "run", ["data=jsonl", f"data.train=[{data}]", "data.eval=[]"], cache_dir,
                          check=False)
    assert proc.returncode == 2
    assert f"{data}:4: invalid UTF-8" in _log(proc)
