"""The console of a real run: each warning once, one accelerator line, the progress bar's fields, the
end-of-stage summary with the numbers of COMPLETE.json, and the stage's wandb run (offline) in its
run's group with the config and the loss plot as an artifact.

ZeRO-3 is the layout whose every step repeated torch's FutureWarning (trainer/logging/console.py says
why), so the 48-step run here is a ZeRO-3 one.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import run_stagecraft, train_records, user_recipe

STEPS = 48


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("console") / "run"
    # 64 records in global batches of 8: 8 steps an epoch, so 6 epochs make the 48 steps.
    proc = run_stagecraft(run_dir, [f"stage.max_steps={STEPS}", "stage.epochs=6", "parallel=zero3",
                                    "logging.progress=true", "logging.wandb_mode=offline"], cache_dir)
    lines = [part.strip() for part in re.split(r"[\r\n]", proc.stdout + proc.stderr) if part.strip()]
    return run_dir, lines


def _warnings(lines: list[str]) -> list[str]:
    """Every warning in the log, as its text without timestamps or a progress bar drawn before it."""
    found = []
    for line in lines:
        for match in re.finditer(r"(/[^\s\]]*?\.py:\d+: \w*Warning: .*)|\[WARNING\]\s*(.*)", line):
            found.append(match.group(1) or match.group(2))
    return found


def test_no_warning_is_printed_twice_and_accelerators_are_one_line(run):
    from trainer.logging.console import accelerator_line

    _, lines = run
    counts = Counter(_warnings(lines))
    assert not [w for w, n in counts.items() if n > 1], counts
    text = "\n".join(lines)
    assert "reduce_scatter_tensor` is deprecated" not in text and "all_gather_into_tensor` is deprecated" not in text
    assert "Setting accelerator to CPU" not in text and "Transformer Engine and Apex are not installed" not in text
    assert sum(accelerator_line() in line for line in lines) == 1


def test_progress_bar_shows_eta_loss_and_throughput(run):
    run_dir, lines = run
    records = train_records(run_dir)
    assert len(records) == STEPS
    middle = [line for line in lines if re.match(rf"sft:\s+50%.*\b24/{STEPS}\b", line)]
    assert middle, "no render of the bar at step 24"
    # tqdm's elapsed<remaining (the ETA), then the postfix with the step-24 values.
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, ", middle[-1])
    assert f"loss={records[23]['loss']:.4g}" in middle[-1] and "tokens_per_s=" in middle[-1]
    final = [line for line in lines if f"{STEPS}/{STEPS}" in line]
    assert f"loss={records[-1]['loss']:.4g}" in final[-1]  # the end-of-stage eval record does not blank it


def test_stage_summary_has_the_numbers_of_complete_json(run):
    run_dir, lines = run
    stage = run_dir / "stages" / "sft"
    result = json.loads((stage / "COMPLETE.json").read_text())
    records = train_records(run_dir)
    rates = sorted(r["tokens_per_s"] for r in records)
    assert result["steps"] == STEPS
    start = lines.index(next(line for line in lines if " stage sft (sft) complete " in line))
    end = start + 1 + lines[start + 1:].index("=" * 72)
    summary = lines[start + 1:end]
    assert summary == [
        f"steps          {STEPS}   ({STEPS} this run, wall time {summary[0].split('wall time ')[1]}",
        f"throughput     {rates[len(rates) // 2]:.1f} tokens/s (median over steps)",
        f"final loss     {records[-1]['loss']:.4f} (step {STEPS})",
        f"eval accuracy  {result['eval_accuracy']:.4f}",
        f"eval loss      {result['eval_loss']:.4f}",
        f"export         {result['hf']}"]
    assert re.fullmatch(r"\d+\.\d s\)", summary[0].split("wall time ")[1])
    assert Path(result["hf"], "config.json").is_file()


def _wandb_records(path: Path):
    """The protobuf records of an offline .wandb file: a 7-byte header, then a leveldb-style log of
    32 KiB blocks whose chunks are (crc32 u32, length u16, type u8) + data; types 1 full, 2/3/4
    first/middle/last piece of a record."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pieces = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def _finished_wandb_records(directory: Path) -> list:
    """The records of the one offline run under ``directory``, once its exit record is on disk: wandb's
    service process may still be writing the file when ``finish()`` has returned."""
    deadline = time.monotonic() + 60
    while True:
        paths = list(directory.glob("wandb/wandb/offline-run-*/run-*.wandb"))
        records = list(_wandb_records(paths[0])) if len(paths) == 1 else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def test_wandb_run_is_named_after_the_stage_in_the_runs_group_with_plots(run):
    run_dir, _ = run
    stage = run_dir / "stages" / "sft"
    cfg = yaml.safe_load((stage / "config.yaml").read_text())
    group = f"{cfg['run']['name']}-{hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]}"
    records = _finished_wandb_records(stage)
    [info] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (info.run_group, info.display_name, info.job_type, info.run_id) == (group, "sft", "sft", f"{group}-sft")
    config = {item.key: json.loads(item.value_json) for item in info.config.update}
    assert config["stage"]["max_steps"] == STEPS and config["run"]["dir"] == str(run_dir)
    [artifact] = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert (artifact.name, artifact.type) == ("sft-plots", "plots")
    assert sorted(entry.path for entry in artifact.manifest.contents) == ["loss_curve.png", "metrics.jsonl"]
    assert (stage / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert sum(r.WhichOneof("record_type") == "history" for r in records) >= STEPS


def test_the_recipe_reports_plots_join_the_same_group(tmp_path):
    from omegaconf import OmegaConf

    from trainer.logging.metrics import log_report, wandb_group

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.plot([1, 2, 3], [3.0, 2.0, 1.5])
    plt.savefig(run_dir / "loss_curves.png")
    plt.close()
    (run_dir / "report.md").write_text("# Recipe\n")
    cfg = OmegaConf.create({"run": {"name": "demo", "dir": str(run_dir)},
                            "logging": {"wandb_mode": "offline", "project": "stagecraft", "entity": None}})
    log_report(run_dir, cfg, ["loss_curves.png"])
    records = _finished_wandb_records(run_dir)
    [info] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (info.run_group, info.display_name) == (wandb_group(cfg), "report")
    assert wandb_group(cfg) == f"demo-{hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]}"
    [artifact] = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert sorted(e.path for e in artifact.manifest.contents) == ["loss_curves.png", "report.md"]


def test_a_recipe_run_logs_its_report_into_the_runs_group(tmp_path, cache_dir):
    """Through the command: a one-stage recipe with wandb offline; the report's run joins the group of
    the stage's run, with the report, the summary and the plots as its artifact."""
    from omegaconf import OmegaConf

    from trainer.logging.metrics import wandb_group

    recipe = {"run": {"name": "tiny"}, "recipe": {
        "name": "tiny", "eval": {"sources": ["chat"], "max_new_tokens": 2, "batch_size": 8},
        "sources": {"chat": {"kind": "sft", "families": ["copy"], "n_train": 16, "n_eval": 8, "seed": 1}},
        "stages": [{"name": "sft", "stage": "sft", "init": "base", "data": [{"source": "chat"}],
                    "overrides": {"max_steps": 1, "eval_max_new_tokens": 0}}]}}
    run_dir = tmp_path / "run"
    run_stagecraft(run_dir, [*user_recipe(tmp_path, "tiny", recipe), "logging.wandb_mode=offline"], cache_dir)
    group = wandb_group(OmegaConf.create({"run": {"name": "tiny", "dir": str(run_dir)}}))
    runs = {}
    for directory in (run_dir, run_dir / "stages" / "sft"):
        records = _finished_wandb_records(directory)
        [info] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        runs[info.display_name] = (info.run_group, records)
    assert {name: g for name, (g, _) in runs.items()} == {"report": group, "sft": group}
    [artifact] = [r.artifact for r in runs["report"][1] if r.WhichOneof("record_type") == "artifact"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "plots" not in summary  # summary.json is written before plotting
    assert sorted(e.path for e in artifact.manifest.contents) == ["accuracy.png", "loss_curves.png", "report.md",
                                                                  "summary.json"]
