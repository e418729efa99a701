"""Single-process contracts of the stage building blocks: LR schedule, global-batch plan, NEFTune,
checkpoint manager, metrics log, and the SFT micro-batch loss shares.

Every test asserts a value derived by hand (closed form or exact identity), never only that the code ran.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from trainer.checkpoint.manager import MARKER, CheckpointManager
from trainer.data.sampler import GlobalBatchPlan
from trainer.logging.metrics import MetricsLogger, read_metrics, truncate_metrics
from trainer.losses import sft_loss, token_logps
from trainer.models.neftune import NEFTune
from trainer.parallel.schedule import lr_multiplier
from trainer.stages.sft import micro_batch_loss

# ---- lr_multiplier ---------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_warmup_ramps_linearly_from_one_over_warmup_to_one(schedule):
    warmup = 4
    values = [lr_multiplier(s, total_steps=20, warmup_steps=warmup, schedule=schedule, min_lr_ratio=0.1)
              for s in range(warmup)]
    # step s (0-based count of updates already taken) gets (s + 1) / warmup: 1/4, 2/4, 3/4, 4/4.
    assert values == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=1e-15)
    assert np.diff(values) == pytest.approx([1 / warmup] * (warmup - 1), abs=1e-15)


def test_cosine_closed_form_midpoint_and_floor():
    total, warmup, floor = 20, 4, 0.1
    f = lambda s: lr_multiplier(s, total, warmup, "cosine", floor)  # noqa: E731
    assert f(warmup) == pytest.approx(1.0, abs=1e-15)  # decay starts from the peak
    # Midpoint of the decay: cos(pi/2) = 0, so min + (1 - min) / 2 = (1 + min) / 2.
    assert f(warmup + (total - warmup) // 2) == pytest.approx((1 + floor) / 2, abs=1e-12)
    for s in range(warmup, total + 1):
        progress = (s - warmup) / (total - warmup)
        assert f(s) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)), abs=1e-12)
    assert all(f(s) > f(s + 1) for s in range(warmup, total))  # strictly decreasing over the decay
    # Reaches the floor at total_steps and stays there.
    assert [f(s) for s in (total, total + 1, total + 50, 10 * total)] == pytest.approx([floor] * 4, abs=1e-12)


def test_constant_schedule_stays_at_one_after_warmup():
    assert [lr_multiplier(s, 10, 3, "constant", 0.1) for s in range(3, 40)] == [1.0] * 37


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_no_warmup_starts_at_one(schedule):
    assert lr_multiplier(0, 10, 0, schedule, 0.2) == 1.0
    if schedule == "cosine":
        assert lr_multiplier(10, 10, 0, schedule, 0.2) == pytest.approx(0.2, abs=1e-12)
        assert lr_multiplier(5, 10, 0, schedule, 0.2) == pytest.approx(0.6, abs=1e-12)


# ---- GlobalBatchPlan -------------------------------------------------------------------------------

N, G = 37, 8  # 37 // 8 = 4 steps per epoch; 5 examples dropped each epoch
# (dp, micro_batch_size): 1x8, 2x4, 4x2 without accumulation, and the same global batch with it.
SPLITS = [(1, 8), (2, 4), (4, 2), (8, 1), (1, 2), (1, 1), (2, 1), (2, 2), (4, 1)]


def _plan(dp=1, mbs=8, seed=0, n=N):
    return GlobalBatchPlan(num_examples=n, global_batch_size=G, micro_batch_size=mbs, dp_size=dp, seed=seed)


@pytest.mark.parametrize("dp,mbs", SPLITS)
def test_rank_micro_batches_tile_the_global_batch_in_order(dp, mbs):
    plan, reference = _plan(dp, mbs), _plan(1, 8)
    assert plan.grad_accum == G // (dp * mbs)
    for step in range(2 * plan.steps_per_epoch + 1):  # crosses two epoch boundaries
        union = []
        for rank in range(dp):
            micro = plan.micro_batches(step, rank)
            assert len(micro) == plan.grad_accum and all(len(m) == mbs for m in micro)
            union += [i for m in micro for i in m]
        assert union == plan.global_batch(step)
        assert union == reference.global_batch(step)  # independent of the layout


def test_grad_accum_arithmetic():
    assert _plan(1, 8).grad_accum == 1
    assert _plan(1, 1).grad_accum == 8
    assert _plan(2, 2).grad_accum == 2
    assert _plan(4, 1).grad_accum == 2
    assert _plan(2, 4).grad_accum == 1
    assert GlobalBatchPlan(100, 48, 3, 4, 0).grad_accum == 4
    assert GlobalBatchPlan(100, 48, 3, 4, 0).steps_per_epoch == 2


def test_each_epoch_is_a_permutation_of_a_prefix_and_epochs_differ():
    plan = _plan()
    assert plan.steps_per_epoch == N // G == 4
    epochs = []
    for epoch in range(3):
        seen = [i for s in range(plan.steps_per_epoch) for i in plan.global_batch(epoch * plan.steps_per_epoch + s)]
        assert len(seen) == plan.steps_per_epoch * G == 32
        assert len(set(seen)) == len(seen)  # no example twice within an epoch
        assert set(seen) <= set(range(N))
        epochs.append(seen)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]


def test_same_seed_same_order_different_seed_different_order():
    steps = range(10)
    a = [_plan(seed=7).global_batch(s) for s in steps]
    assert a == [_plan(seed=7).global_batch(s) for s in steps]
    assert a != [_plan(seed=8).global_batch(s) for s in steps]


def test_fewer_examples_than_one_global_batch_is_rejected():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _plan(n=G - 1)
    assert _plan(n=G).steps_per_epoch == 1  # exactly one batch is enough
    assert sorted(_plan(n=G).global_batch(0)) == list(range(G))


# ---- NEFTune ---------------------------------------------------------------------------------------


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, ids):
        return self.embed(ids)


def _neftune_setup(alpha=5.0):
    torch.manual_seed(0)
    model = _TinyLM()
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    clean = model.embed.weight[ids].detach().clone()
    return model, ids, clean, NEFTune(model, alpha)


def test_neftune_leaves_eval_outputs_unchanged():
    model, ids, clean, neft = _neftune_setup()
    model.eval()
    neft.reseed(0, 1, 2, 3)
    assert torch.equal(model(ids), clean)


def test_neftune_noise_is_bounded_nonzero_and_fills_the_bound():
    alpha = 5.0
    model, ids, clean, neft = _neftune_setup(alpha)
    model.train()
    neft.reseed(0, 1, 2, 3)
    noise = model(ids).detach() - clean
    bound = alpha / math.sqrt(12 * 16)  # alpha / sqrt(L * d)
    assert noise.abs().max() <= bound * (1 + 1e-6)
    assert (noise != 0).all()
    # U(-1, 1) * bound over 576 draws: the extremes come close to the bound, the mean close to 0.
    assert noise.abs().max() > 0.95 * bound
    assert abs(noise.mean().item()) < 0.1 * bound


def test_neftune_reseed_is_reproducible_and_key_dependent():
    model, ids, clean, neft = _neftune_setup()
    model.train()

    def noise(*keys):
        neft.reseed(*keys)
        return model(ids).detach() - clean

    first = noise(42, 7, 1, 0)
    assert torch.equal(first, noise(42, 7, 1, 0))
    for other in [(42, 7, 1, 1), (42, 8, 1, 0), (42, 7, 0, 1), (43, 7, 1, 0)]:
        assert not torch.allclose(first, noise(*other))


def test_neftune_remove_detaches_the_hook():
    model, ids, clean, neft = _neftune_setup()
    model.train()
    neft.reseed(1)
    assert not torch.equal(model(ids), clean)
    neft.remove()
    assert torch.equal(model(ids), clean)


def test_neftune_alpha_zero_is_identity():
    model, ids, clean, neft = _neftune_setup(alpha=0.0)
    model.train()
    neft.reseed(1)
    assert torch.equal(model(ids), clean)


# ---- CheckpointManager -----------------------------------------------------------------------------


class _FakeStrategy:
    """Writes the client state where DeepSpeed would write its shards: ``<ckpt_dir>/<tag>/``."""

    def save(self, ckpt_dir: Path, tag: str, client_state: dict) -> None:
        (Path(ckpt_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(ckpt_dir) / tag / "state.json").write_text(json.dumps(client_state))

    def load(self, ckpt_dir: Path, tag: str, saved: dict) -> dict:
        self.saved = saved  # the layout that wrote it, for the strategy to reshard from
        return json.loads((Path(ckpt_dir) / tag / "state.json").read_text())


def _topology(world_size=1, tp=1):
    # The manager reads is_main, rank, world_size, dp, tp and calls barrier().
    return SimpleNamespace(world_size=world_size, rank=0, dp=world_size // tp, tp=tp, pp=1, is_main=True,
                           barrier=lambda: None)


def _saved(tmp_path, steps=(3, 6, 9), keep_last=2):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last, _topology())
    for step in steps:
        manager.save(_FakeStrategy(), step, {"step": step})
    return manager


def test_keep_last_prunes_old_checkpoints_and_latest_names_newest(tmp_path):
    manager = _saved(tmp_path)
    assert sorted(p.name for p in manager.dir.iterdir()) == ["latest", "step_000006", "step_000009"]
    assert (manager.dir / "latest").read_text() == "step_000009"
    assert manager.latest() == manager.dir / "step_000009"
    assert manager.complete_tags() == ["step_000006", "step_000009"]
    meta = json.loads((manager.dir / "step_000009" / MARKER).read_text())
    assert meta == {"step": 9, "world_size": 1, "dp": 1, "tp": 1, "pp": 1}
    assert (manager.dir / "step_000009" / "rng_rank0.pt").is_file()
    assert manager.load(_FakeStrategy(), manager.latest()) == {"step": 9}


def test_torn_writes_are_never_latest(tmp_path):
    manager = _saved(tmp_path)
    torn = manager.dir / "step_000012.partial"
    _FakeStrategy().save(manager.dir, torn.name, {"step": 12})  # crashed before the marker
    assert manager.latest() == manager.dir / "step_000009"
    unmarked = manager.dir / "step_000012"
    _FakeStrategy().save(manager.dir, unmarked.name, {"step": 12})  # a final-named dir without a marker
    assert manager.latest() == manager.dir / "step_000009"
    (manager.dir / "latest").write_text("step_000012")  # even when the pointer names it
    assert manager.latest() == manager.dir / "step_000009"
    assert manager.complete_tags() == ["step_000006", "step_000009"]
    # The next save of that step replaces the unmarked dir whole and cleans the stale partial.
    manager.save(_FakeStrategy(), 12, {"step": 12})
    assert sorted(p.name for p in manager.dir.iterdir()) == ["latest", "step_000009", "step_000012"]
    assert manager.latest() == manager.dir / "step_000012"


def test_latest_pointer_to_deleted_checkpoint_falls_back_to_newest_complete(tmp_path):
    manager = _saved(tmp_path)
    shutil.rmtree(manager.dir / "step_000009")
    assert (manager.dir / "latest").read_text() == "step_000009"
    assert manager.latest() == manager.dir / "step_000006"
    (manager.dir / "step_000006" / MARKER).unlink()  # and with no complete checkpoint at all
    assert manager.latest() is None


def test_latest_is_none_without_a_directory(tmp_path):
    assert CheckpointManager(tmp_path / "absent", 2, _topology()).latest() is None


@pytest.mark.parametrize("world_size,tp", [(2, 1), (2, 2)])
def test_load_with_a_different_layout_hands_the_strategy_the_saved_one(tmp_path, world_size, tp):
    """The strategy reshards; a rank whose RNG file the old layout never wrote gets RNG derived from
    (seed, step, rank), the same on every attempt."""
    manager = _saved(tmp_path, steps=(3,))
    other = CheckpointManager(manager.dir, 2, _topology(world_size=world_size, tp=tp), seed=7)
    other.topology.rank = 1
    strategy = _FakeStrategy()
    assert other.load(strategy, manager.latest()) == {"step": 3}
    assert strategy.saved == {"step": 3, "world_size": 1, "dp": 1, "tp": 1, "pp": 1}
    first = torch.rand(3)
    other.load(strategy, manager.latest())
    assert torch.equal(first, torch.rand(3))


def test_load_restores_every_rng(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", 2, _topology())
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    path = manager.save(_FakeStrategy(), 3, {"step": 3})

    def draw():
        return torch.rand(5), random.random(), np.random.rand(3)

    before = draw()
    draw()  # advance further, so a no-op load would be caught
    assert manager.load(_FakeStrategy(), path) == {"step": 3}
    after = draw()
    assert torch.equal(before[0], after[0])
    assert before[1] == after[1]
    assert np.array_equal(before[2], after[2])


# ---- metrics ---------------------------------------------------------------------------------------


def _strict_loads(line: str) -> dict:
    def reject(name):
        raise AssertionError(f"non-standard JSON constant {name} in {line!r}")

    return json.loads(line, parse_constant=reject)


def test_truncate_metrics_keeps_earlier_records_byte_identical(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 0.1 * s, "lr": 1e-7, "note": "é", "bad": "nan"} for s in range(1, 7)]
    lines = [json.dumps(r) + "\n" for r in records]
    path.write_text("".join(lines))
    truncate_metrics(path, 3)
    assert path.read_text() == "".join(lines[:3])
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_truncate_missing_file_is_a_noop(tmp_path):
    path = tmp_path / "metrics.jsonl"
    truncate_metrics(path, 3)
    assert not path.exists()
    assert read_metrics(path) == []


def _logging_cfg():
    return OmegaConf.create({"logging": {"log_every": 1, "wandb_mode": "disabled", "progress": False}})


def test_metrics_logger_appends_json_lines_and_stringifies_non_finite(tmp_path):
    logger = MetricsLogger(tmp_path, _logging_cfg(), "sft", total_steps=10, start_step=0, enabled=True)
    logger.log(1, {"loss": torch.tensor(0.25), "lr": 1e-3, "n": 3})
    logger.log(2, {"loss": float("nan"), "grad_norm": torch.tensor(float("inf")), "x": np.float64(-np.inf)})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [_strict_loads(line) for line in lines] == [
        {"step": 1, "loss": 0.25, "lr": 1e-3, "n": 3},
        {"step": 2, "loss": "nan", "grad_norm": "inf", "x": "-inf"},
    ]


def test_metrics_logger_resume_drops_later_lines(tmp_path):
    logger = MetricsLogger(tmp_path, _logging_cfg(), "sft", total_steps=10, start_step=0, enabled=True)
    for step in range(1, 6):
        logger.log(step, {"loss": float(step)})
    logger.close()
    resumed = MetricsLogger(tmp_path, _logging_cfg(), "sft", total_steps=10, start_step=3, enabled=True)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    resumed.log(4, {"loss": 40.0})
    resumed.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0}, {"step": 4, "loss": 40.0}]


def test_disabled_metrics_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, _logging_cfg(), "sft", total_steps=10, start_step=0, enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists()


# ---- micro_batch_loss ------------------------------------------------------------------------------

LENGTHS = [1, 7, 3, 12, 0, 5, 2, 9]  # unequal target counts, one row with none; global batch of 8
VOCAB, HIDDEN = 11, 6


def _sft_problem(seed=0):
    """Fixed inputs and labels, and a Linear whose weights every split differentiates."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(LENGTHS), max(LENGTHS) + 2
    x = torch.randn(b, t, HIDDEN, generator=g, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (b, t), generator=g)
    mask = torch.zeros(b, t)
    for i, n in enumerate(LENGTHS):
        mask[i, 1:1 + n] = 1
    torch.manual_seed(seed)
    head = torch.nn.Linear(HIDDEN, VOCAB, dtype=torch.float64)
    return x, labels, mask, head


def _grads(head):
    return [p.grad.detach().clone() for p in head.parameters()]


def _full_batch(head, x, labels, mask, reduction):
    head.zero_grad()
    loss = sft_loss(head(x), labels, mask, reduction)
    loss.backward()
    return loss.detach(), _grads(head)


def _split(head, x, labels, mask, reduction, dp, mbs):
    """Each simulated rank accumulates its micro-batches; rank gradients are summed (all-reduce)."""
    global_tokens = mask.sum().to(torch.float32)  # what the stage all-reduces up front
    per_rank = len(LENGTHS) // dp
    total_loss, total_grads = torch.zeros((), dtype=torch.float64), None
    for rank in range(dp):
        head.zero_grad()
        for start in range(rank * per_rank, (rank + 1) * per_rank, mbs):
            rows = slice(start, start + mbs)
            batch = {"labels": labels[rows], "loss_mask": mask[rows]}
            logps = token_logps(head(x[rows]), labels[rows])
            loss = micro_batch_loss(logps, batch, reduction, global_tokens, len(LENGTHS))
            loss.backward()
            total_loss += loss.detach()
        grads = _grads(head)
        total_grads = grads if total_grads is None else [a + b for a, b in zip(total_grads, grads)]
    return total_loss, total_grads


@pytest.mark.parametrize("reduction", ["token", "sample"])
@pytest.mark.parametrize("dp,mbs", [(1, 8), (2, 4), (4, 2), (1, 4), (1, 2), (2, 2), (2, 1), (1, 1)])
def test_micro_batch_shares_sum_to_the_global_loss_and_gradient(reduction, dp, mbs):
    x, labels, mask, head = _sft_problem()
    full_loss, full_grads = _full_batch(head, x, labels, mask, reduction)
    loss, grads = _split(head, x, labels, mask, reduction, dp, mbs)
    assert loss.item() == pytest.approx(full_loss.item(), abs=1e-12)
    for got, want in zip(grads, full_grads):
        assert want.abs().max() > 1e-3  # the comparison is not vacuous
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_sample_reduction_weights_rows_equally():
    x, labels, mask, head = _sft_problem()
    with torch.no_grad():
        logits = head(x)
        per_row = [sft_loss(logits[i:i + 1], labels[i:i + 1], mask[i:i + 1], "token") if n else torch.tensor(0.0)
                   for i, n in enumerate(LENGTHS)]
        want = sum(per_row) / len(LENGTHS)
        assert sft_loss(logits, labels, mask, "sample").item() == pytest.approx(want.item(), abs=1e-12)
        shares = sum(micro_batch_loss(token_logps(logits[i:i + 2], labels[i:i + 2]),
                                      {"labels": labels[i:i + 2], "loss_mask": mask[i:i + 2]},
                                      "sample", mask.sum(), len(LENGTHS)) for i in range(0, 8, 2))
        assert shares.item() == pytest.approx(want.item(), abs=1e-12)


@pytest.mark.parametrize("mbs", [2, 4])
def test_naive_mean_of_micro_batch_token_means_gives_a_different_gradient(mbs):
    """Negative control: normalising each micro-batch by its own token count re-weights tokens."""
    x, labels, mask, head = _sft_problem()
    _, full_grads = _full_batch(head, x, labels, mask, "token")
    n_micro = len(LENGTHS) // mbs
    head.zero_grad()
    for start in range(0, len(LENGTHS), mbs):
        rows = slice(start, start + mbs)
        (sft_loss(head(x[rows]), labels[rows], mask[rows], "token") / n_micro).backward()
    naive = _grads(head)
    assert max((a - b).abs().max().item() for a, b in zip(naive, full_grads)) > 1e-3


@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_packed_micro_batch_loss_equals_padded(reduction):
    """The same per-token log-probs laid out padded (chat.collate) or packed (pack_examples) give the
    same micro-batch share, for both reductions."""
    from trainer.data.chat import collate
    from trainer.data.packing import pack_examples

    g = torch.Generator().manual_seed(11)
    examples = []
    for n in (5, 9, 3, 7):
        mask = [0] * 2 + [1] * (n - 2)
        examples.append({"input_ids": torch.randint(3, 50, (n,), generator=g).tolist(), "assistant_mask": mask})
    # A deterministic "model": log-prob of a label depends only on (previous token, label).
    table = -torch.rand(64, 64, generator=g, dtype=torch.float64) * 3

    def logps(batch):
        return table[batch["input_ids"], batch["labels"]]

    padded, packed = collate(examples, pad_id=0), pack_examples(examples, max_length=12, pad_id=0)
    assert packed["input_ids"].shape[0] < len(examples)  # really packed
    tokens = padded["loss_mask"].sum()
    a = micro_batch_loss(logps(padded), padded, reduction, tokens, 8)
    b = micro_batch_loss(logps(packed), packed, reduction, tokens, 8)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
