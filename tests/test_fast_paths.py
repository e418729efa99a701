"""The fast paths against the plain path: packing, prompt sharing and the chunked LM head (issue 11).

Each fast path must leave every log-prob, loss and gradient as the plain layout's (right-padded rows,
full-vocabulary logits) within fp32 tolerance. In-process checks cover the layouts on a bare transformers
model (sdpa and eager) and the chunked head as a function; one torchrun launch per world size (this
file's ``__main__``, 1 and 2 processes) runs every layout x head combination through DeepSpeedStrategy
under ZeRO-2 and ZeRO-3, on an untied Llama and a tied Qwen2 (the head weight partitioned, and shared
with the embedding), and compares per-pair log-probs, the losses and every full gradient.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 400


def _tokenized_pairs(tok) -> list[dict]:
    """Synthetic pairs plus one by hand whose responses share two tokens (7, 8): the shared prefix must
    stop before the first response token, so those two are scored on each side."""
    from trainer.data.preference import synthetic_preference_records, tokenize_pair

    families = ["reverse", "sort", "upper", "copy", "swap_pairs", "count", "code_expr"]
    pairs = [tokenize_pair(tok, r, 64) for r in synthetic_preference_records(7, 3, families)]
    pairs.append({"chosen": {"input_ids": [1, 5, 6, 7, 8, 9], "assistant_mask": [0, 0, 0, 1, 1, 1]},
                  "rejected": {"input_ids": [1, 5, 6, 7, 8, 3, 4], "assistant_mask": [0, 0, 0, 1, 1, 1, 1]},
                  "chosen_reward": None, "rejected_reward": None})
    return pairs


@pytest.fixture(scope="module")
def pairs(cache_dir) -> list[dict]:
    from trainer.data import build_embedded_tokenizer

    return _tokenized_pairs(build_embedded_tokenizer(VOCAB, cache_dir))


# --- prompt sharing: the layout itself ------------------------------------------------------------------


def test_shared_prefix_stops_before_the_first_scored_label():
    from trainer.data.prefix_sharing import CHOSEN, REJECTED, SHARED, allowed, share_pairs, shared_length

    chosen = {"input_ids": [1, 5, 6, 7, 8, 9], "assistant_mask": [0, 0, 0, 1, 1, 1]}
    rejected = {"input_ids": [1, 5, 6, 7, 8, 3, 4], "assistant_mask": [0, 0, 0, 1, 1, 1, 1]}
    assert shared_length(chosen, rejected) == 2  # inputs 1, 5 (labels 5, 6); label 7 is scored
    batch = share_pairs([{"chosen": chosen, "rejected": rejected}], max_length=8, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 8, 6, 7, 8, 3]]
    assert batch["labels"].tolist() == [[5, 6, 7, 8, 9, 7, 8, 3, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 4, 5]]
    assert batch["seq_id"].tolist() == [[-1, -1, 0, 0, 0, 1, 1, 1, 1]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1, 1, 1]]
    assert batch["branch"].tolist() == [[SHARED] * 2 + [CHOSEN] * 3 + [REJECTED] * 4]
    mask = allowed(batch["block"], batch["branch"])[0]
    assert mask[5].tolist() == [True, True, False, False, False, True, False, False, False]  # rejected: prompt + itself
    assert mask[4].tolist() == [True] * 5 + [False] * 4  # chosen: prompt + itself, causally


def test_padding_and_other_pairs_are_invisible(pairs):
    from trainer.data.prefix_sharing import allowed, share_pairs

    batch = share_pairs(pairs, max_length=64, pad_id=0)
    assert batch["input_ids"].shape[0] < len(pairs)  # several pairs per row
    mask = allowed(batch["block"], batch["branch"])
    block = batch["block"]
    assert not ((block[:, :, None] != block[:, None, :]) & mask).any()  # no pair sees another
    pad = block < 0
    assert torch.equal(mask[pad], torch.eye(block.shape[1], dtype=torch.bool).expand_as(mask)[pad])  # only itself
    assert not (mask & pad[:, None, :] & ~pad[:, :, None]).any()  # no real token sees padding
    one_per_row = share_pairs(pairs, max_length=64, pad_id=0, pack=False)
    assert one_per_row["input_ids"].shape[0] == len(pairs)


def _model(arch: str, attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prompt_shared_logps_and_grads_equal_padded(pairs, attn):
    """Per-pair response log-probs and their gradients (through a DPO loss) equal the padded layout's."""
    from trainer.data.prefix_sharing import attention_bias, share_pairs
    from trainer.data.preference import collate_pairs
    from trainer.losses import dpo_loss, token_logps
    from trainer.stages.reference import pair_logps

    model = _model("llama", attn)

    def run(batch):
        model.zero_grad()
        if "branch" in batch:
            kwargs = {"position_ids": batch["position_ids"],
                      "attention_mask": attention_bias(batch["block"], batch["branch"], torch.float32)}
        else:
            kwargs = {"attention_mask": batch["attention_mask"]}
        logps = token_logps(model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits, batch["labels"])
        c, r, n_c, n_r = pair_logps(logps, batch, average=False)
        dpo_loss(c, r, torch.zeros_like(c), torch.zeros_like(r), 0.1).mean().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        return torch.stack([c, r, n_c, n_r]).detach(), grads

    want, want_grads = run(collate_pairs(pairs, 0))
    for pack in (True, False):
        got, got_grads = run(share_pairs(pairs, max_length=64, pad_id=0, pack=pack))
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
        for k in want_grads:
            torch.testing.assert_close(got_grads[k], want_grads[k], rtol=1e-4, atol=1e-6)


# --- the chunked head -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_head_equals_full_logits(tied):
    """Values and gradients (hidden states and head weight) of the chunked computation equal the full
    logits', with a label mask and ignored labels (-100: log-prob 0 on both paths), for chunk sizes that do
    and do not divide the token count."""
    from trainer.losses import token_logps
    from trainer.losses.chunked import chunked_token_logps

    torch.manual_seed(1)
    embed = torch.nn.Embedding(50, 16)
    head = torch.nn.Linear(16, 50, bias=False)
    if tied:
        head.weight = embed.weight
    ids = torch.randint(0, 50, (3, 11))
    labels = torch.roll(ids, -1, 1)
    labels[0, :3] = -100
    mask = (torch.rand(3, 11) > 0.3).float()

    def run(chunk):
        embed.zero_grad(), head.zero_grad()
        hidden = torch.tanh(embed(ids))
        logps = chunked_token_logps(hidden, head, labels, chunk) if chunk else token_logps(head(hidden), labels)
        (-(logps * mask).sum() / mask.sum()).backward()
        return logps.detach(), head.weight.grad.clone(), embed.weight.grad.clone()

    want = run(0)
    assert torch.all(want[0][0, :3] == 0)
    for chunk in (1, 4, 7, 33, 64):
        for a, b in zip(run(chunk), want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --- segment attention ---------------------------------------------------------------------------------


def test_segments_by_hand():
    from trainer.models.segment_attention import packed_segments, shared_segments

    # Packed: sequences of 3 and 2 tokens, then padding that restarts its positions.
    assert packed_segments(torch.tensor([[0, 1, 2, 0, 1, 0, 1]])) == [[(0, 3), (3, 5), (5, 7)]]
    # Shared: pair 0 = prefix 2, chosen 2, rejected 1; pair 1 = prefix 1, chosen 1, rejected 2; padding 1.
    block = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, -1]])
    branch = torch.tensor([[0, 0, 1, 1, 2, 0, 1, 2, 2, 0]])
    assert shared_segments(block, branch) == [[(0, 4), (0, 2, 4, 5), (5, 7), (5, 6, 7, 9), (9, 9, 9, 10)]]
    with pytest.raises(ValueError, match="not \\[shared \\| chosen \\| rejected\\]"):
        shared_segments(torch.tensor([[0, 0, 0]]), torch.tensor([[0, 2, 1]]))


def test_segment_attention_equals_the_mask():
    """Each layout's segments against SDPA with the layout's full mask: outputs and input gradients."""
    from trainer.data.prefix_sharing import allowed
    from trainer.models import segment_attention

    segment_attention.register()
    block = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, -1]])
    branch = torch.tensor([[0, 0, 1, 1, 2, 0, 1, 2, 2, 0]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]])
    pos = position_ids[0]
    starts = torch.cumsum(torch.cat([torch.ones(1, dtype=torch.long), (pos[1:] != pos[:-1] + 1).long()]), 0)
    packed_mask = (starts[:, None] == starts[None, :]) & torch.ones(10, 10, dtype=torch.bool).tril()
    module = torch.nn.Module()
    torch.manual_seed(0)
    for mask, segments, real in (
            (packed_mask[None], segment_attention.packed_segments(position_ids), torch.ones(10, dtype=torch.bool)),
            (allowed(block, branch), segment_attention.shared_segments(block, branch), block[0] >= 0)):
        q, k, v = (torch.randn(1, 4, 10, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
        k2, v2 = k[:, :2], v[:, :2]  # grouped-query: 2 key/value heads for 4 query heads
        got, _ = segment_attention.attention(module, q, k2, v2, None, scaling=0.3, segments=segments)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k2.repeat_interleave(2, 1), v2.repeat_interleave(2, 1), attn_mask=mask[:, None], scale=0.3).transpose(1, 2)
        torch.testing.assert_close(got[:, real], want[:, real], rtol=0, atol=1e-12)
        weights = torch.randn_like(want) * real[None, :, None, None]
        grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
        for g, w in zip(grads, torch.autograd.grad((want * weights).sum(), (q, k, v))):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_one_row_drops_padding_and_spread_restores_the_layout():
    """Two packed rows and two prompt-shared rows laid end to end: the row holds exactly the real
    positions, in order; the segments equal each row's own, shifted (a shared row's slots restart at 0,
    so joining rows must not merge the last pair of one row with the first of the next); the attention
    of the joined row equals that of the padded rows; spread puts values back with zeros on padding."""
    from trainer.models import segment_attention

    packed = {"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]]),
              "seq_id": torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 3, 3, 3, 3]])}
    shared = {"block": torch.tensor([[0, 0, 0, 0, -1, -1], [0, 0, 0, 1, 1, 1]]),
              "branch": torch.tensor([[0, 1, 2, 2, 0, 0], [0, 1, 2, 0, 1, 2]]),
              "position_ids": torch.tensor([[0, 1, 1, 2, 0, 0], [0, 1, 1, 0, 1, 1]])}
    for batch, want in ((packed, [(0, 3), (3, 5), (5, 7), (7, 11)]),
                        (shared, [(0, 2), (0, 1, 2, 4), (4, 6), (4, 5, 6, 7), (7, 9), (7, 8, 9, 10)])):
        batch = {**batch, "input_ids": torch.arange(12).view(2, 6), "labels": torch.arange(12).view(2, 6) + 100}
        real, ids, labels, inputs = segment_attention.one_row(batch)
        assert inputs["segments"] == [want]
        torch.testing.assert_close(ids[0], batch["input_ids"][real])
        torch.testing.assert_close(labels[0], batch["labels"][real])
        torch.testing.assert_close(inputs["position_ids"][0], batch["position_ids"][real])
        values = torch.randn(1, int(real.sum()), requires_grad=True)
        spread = segment_attention.spread(values, real)
        assert torch.equal(spread[real], values[0].detach()) and torch.all(spread[~real] == 0)
        weights = torch.randn(2, 6)
        (grad,) = torch.autograd.grad((spread * weights).sum(), values)
        torch.testing.assert_close(grad[0], weights[real])

        # attention over the joined row equals the per-row segments' attention on the padded rows
        rows = [(segment_attention.shared_segments(batch["block"][r:r + 1], batch["branch"][r:r + 1])
                 if "branch" in batch else segment_attention.packed_segments(batch["position_ids"][r:r + 1]))[0]
                for r in range(2)]
        q, k, v = (torch.randn(2, 4, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
        padded, _ = segment_attention.attention(torch.nn.Module(), q, k, v, None, scaling=0.3, segments=rows)
        flat = [t.transpose(1, 2)[real].transpose(0, 1)[None] for t in (q, k, v)]
        joined, _ = segment_attention.attention(torch.nn.Module(), *flat, None, scaling=0.3,
                                                segments=inputs["segments"])
        torch.testing.assert_close(joined[0], padded[real], rtol=0, atol=1e-12)
        weights = torch.randn_like(padded) * real[:, :, None, None]
        for g, w in zip(torch.autograd.grad((joined[0] * weights[real]).sum(), (q, k, v)),
                        torch.autograd.grad((padded * weights).sum(), (q, k, v))):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reward_scores_in_one_row_equal_the_padded_rows(arch):
    """A reward model's attribute scores and every gradient (through a masked MSE) are the same from
    right-padded rows and from one padding-free row with attention per sequence, for rows of 1 to 23
    tokens; left-padded rows are refused."""
    from trainer.data.preference import collate_reward
    from trainer.losses import reward_regression_loss
    from trainer.models import segment_attention
    from trainer.models.reward import RewardModel, reward_inputs

    model = RewardModel(_model(arch, "sdpa"), ["a", "b", "c"], [1.0, 0.5, 0.0])
    gen = torch.Generator().manual_seed(3)
    examples = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=gen).tolist(),
                 "targets": torch.rand(3, generator=gen).tolist(), "target_mask": [1.0, 1.0, float(n % 2)]}
                for n in (23, 1, 9, 17, 4)]
    batch = collate_reward(examples, 0)

    def run(one_row):
        model.zero_grad()
        scores = model(**reward_inputs(batch, one_row))
        reward_regression_loss(scores, batch["targets"], batch["target_mask"]).backward()
        return scores.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    (want, want_grads), (got, got_grads) = run(False), run(True)
    assert batch["attention_mask"].numel() == 5 * 23 and got.shape == want.shape == (5, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 4
    for k in want_grads:
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.scores(batch).detach(), want, rtol=0, atol=1e-5)
    left = {**batch, "attention_mask": batch["attention_mask"].flip(1)}
    with pytest.raises(ValueError, match="right-padded"):
        segment_attention.last_token_row(left)


def test_segment_attention_is_only_for_full_causal_attention():
    from transformers import AutoConfig

    from trainer.models import segment_attention

    def config(arch, attn="sdpa"):
        return AutoConfig.for_model(arch, attn_implementation=attn)

    assert segment_attention.supported(config("llama"))
    assert segment_attention.supported(config("qwen2"))  # use_sliding_window false
    assert not segment_attention.supported(config("llama", "eager"))  # the mask path of eager attention
    assert not segment_attention.supported(config("mistral"))  # sliding_window 4096
    assert not segment_attention.supported(config("gemma2"))  # soft-capping, sliding layers
    with pytest.raises(NotImplementedError, match="parallel.segment_attention=false"):
        q = torch.zeros(1, 1, 2, 4)
        segment_attention.attention(torch.nn.Module(), q, q, q, None, segments=[[(0, 2)]], sliding_window=8)


# --- layout resolution ----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy,stage,want", [
    ("deepspeed", "sft", {"packing": True, "prefix_sharing": False}),
    ("deepspeed", "dpo", {"packing": True, "prefix_sharing": True}),
    ("deepspeed", "reward", {"packing": False, "prefix_sharing": False}),
    ("megatron", "sft", {"packing": False, "prefix_sharing": False}),
    ("megatron", "dpo", {"packing": False, "prefix_sharing": False}),
])
def test_auto_layout_is_on_where_the_strategy_supports_it(strategy, stage, want):
    from omegaconf import OmegaConf

    from trainer.config.validate import resolve_layout

    cfg = OmegaConf.create({"parallel": {"strategy": strategy}, "model": {"attn_implementation": "sdpa"},
                            "stage": {"type": {"dpo": "preference"}.get(stage, stage), "packing": None,
                                      "prefix_sharing": None}})
    assert resolve_layout(cfg) == want
    cfg.stage.packing = False
    assert resolve_layout(cfg)["packing"] is False
    if strategy == "megatron":
        cfg.stage.packing = True
        with pytest.raises(ValueError, match="^stage.packing: parallel.strategy=megatron"):
            resolve_layout(cfg)


# --- through DeepSpeedStrategy, 1 and 2 processes, ZeRO-2 and ZeRO-3 ------------------------------------


def worker(data: Path, out: Path) -> None:
    from deepspeed.utils import safe_get_full_grad
    from omegaconf import DictConfig

    from trainer.data.chat import collate
    from trainer.data.packing import pack_examples, pack_pairs
    from trainer.data.prefix_sharing import share_pairs
    from trainer.data.preference import collate_pairs
    from trainer.losses import dpo_loss, sft_loss_from_logps
    from trainer.models import segment_attention
    from trainer.parallel.deepspeed import DeepSpeedStrategy
    from trainer.parallel.topology import Topology
    from trainer.stages.reference import pair_logps

    all_pairs = json.loads(data.read_text())
    optim = DictConfig({"lr": 0.0, "weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-8, "grad_clip": 0.0,
                        "warmup_steps": 0, "schedule": "constant", "min_lr_ratio": 1.0})
    base = {"strategy": "deepspeed", "tp": 1, "pp": 1, "cp": 1, "dp": -1, "virtual_pp": 1, "sequence_parallel": False,
            "precision": "fp32", "offload_optimizer": False, "activation_checkpointing": False, "device": "cpu",
            "backend": "gloo", "timeout_minutes": 5.0, "logits_chunk_tokens": 0, "segment_attention": False}
    topology = Topology.initialize(DictConfig({**base, "zero_stage": 2}))
    pairs = all_pairs[topology.rank::topology.world_size]  # each rank its own data
    examples = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    layouts = {"pairs": {"padded": collate_pairs(pairs, 0), "packed": pack_pairs(pairs, 64, 0),
                         "shared": share_pairs(pairs, 64, 0), "shared_unpacked": share_pairs(pairs, 64, 0, pack=False)},
               "sft": {"padded": collate(examples, 0), "packed": pack_examples(examples, 64, 0)}}
    worst: dict[str, float] = {}
    for zero in (2, 3):
        for arch, tied in (("llama", False), ("qwen2", True)):
            from transformers import AutoConfig, AutoModelForCausalLM

            torch.manual_seed(0)
            config = AutoConfig.for_model(arch, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          tie_word_embeddings=tied, max_position_embeddings=256)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
            model.config.use_cache = False
            assert segment_attention.supported(model.config), arch  # else the segment runs test the mask
            strategy = DeepSpeedStrategy(DictConfig({**base, "zero_stage": zero}), topology)
            strategy.setup(model, optim, micro_batch_size=len(pairs), grad_accum=1, total_steps=100)
            for kind, variants in layouts.items():
                results = {}
                for layout, chunk, segments in itertools.product(variants, (0, 16, 4096), (False, True)):
                    batch = variants[layout]
                    strategy.parallel.logits_chunk_tokens = chunk
                    strategy.parallel.segment_attention = segments
                    logps = strategy.token_logps(batch)
                    if kind == "pairs":
                        c, r, _, _ = pair_logps(logps, batch, average=False)
                        values = torch.stack([c, r])
                        loss = dpo_loss(c, r, -torch.ones_like(c), -torch.ones_like(r), 0.1).mean()
                    else:
                        values = (logps * batch["loss_mask"]).sum()[None]
                        loss = sft_loss_from_logps(logps, batch["loss_mask"], "token")
                    strategy.engine.backward(loss)
                    grads = [safe_get_full_grad(p).clone() for p in strategy.module.parameters()]
                    strategy.engine.step()  # lr 0: the weights stay, the gradients are freed
                    results[(layout, chunk, segments)] = (values.detach(), loss.detach(), grads)
                want = results[("padded", 0, False)]
                for key, got in results.items():
                    name = f"zero{zero}/{arch}/{kind}/{key[0]}/chunk{key[1]}/segments={key[2]}"
                    # log-prob sums relative to their size (an SFT batch sums ~10^3 nats); loss and grads absolute
                    scale = want[0].abs().max().clamp(min=1)
                    worst[name] = max([((got[0] - want[0]).abs().max() / scale).item(),
                                       (got[1] - want[1]).abs().item()]
                                      + [(g - w).abs().max().item() for g, w in zip(got[2], want[2])])
            del strategy
    if topology.is_main:
        out.write_text(json.dumps(worst))
    topology.destroy()


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [1, 2])
def test_fast_paths_through_deepspeed(pairs, tmp_path, nproc):
    from tests.conftest import free_port

    data, out = tmp_path / "pairs.json", tmp_path / "worst.json"
    data.write_text(json.dumps([{"chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                           f"--master_port={free_port()}", __file__, str(data), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    worst = json.loads(out.read_text())
    assert len(worst) == 2 * 2 * (4 + 2) * 3 * 2
    bad = {k: v for k, v in worst.items() if v > 2e-5}
    assert not bad, bad


def allreduce_worker(data: Path, out: Path) -> None:
    """ZeRO-0 on one rank with DeepSpeed's gradient all-reduce skipped (the default) against the same
    run with it on: the parameters after 3 steps of 2 micro-batches must be equal bit for bit, including a
    trainable parameter the forward never reaches (zero gradient: weight decay still moves it)."""
    from omegaconf import DictConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.data.chat import collate
    from trainer.losses import sft_loss_from_logps
    from trainer.parallel.deepspeed import DeepSpeedStrategy
    from trainer.parallel.topology import Topology

    examples = [p["chosen"] for p in json.loads(data.read_text())][:8]
    batches = [collate(examples[i:i + 2], 0) for i in range(0, 8, 2)]
    optim = DictConfig({"lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "grad_clip": 1.0,
                        "warmup_steps": 0, "schedule": "constant", "min_lr_ratio": 1.0})
    base = {"strategy": "deepspeed", "tp": 1, "pp": 1, "cp": 1, "dp": -1, "virtual_pp": 1, "sequence_parallel": False,
            "offload_optimizer": False, "activation_checkpointing": False, "device": "cpu", "zero_stage": 0,
            "backend": "gloo", "timeout_minutes": 5.0, "logits_chunk_tokens": 512, "segment_attention": True}
    topology = Topology.initialize(DictConfig({**base, "precision": "fp32"}))
    report = {}
    for precision in ("fp32", "bf16"):
        finals = {}
        for allreduce in (False, True):
            torch.manual_seed(0)
            config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
            model.register_parameter("unused", torch.nn.Parameter(torch.ones(4, 4)))
            strategy = DeepSpeedStrategy(DictConfig({**base, "precision": precision}), topology)
            strategy.setup(model, optim, micro_batch_size=2, grad_accum=2, total_steps=10)
            report[f"{precision}/default_skips"] = not strategy.engine.enable_backward_allreduce
            if allreduce:
                strategy.engine.enable_backward_allreduce, strategy._zero_missing_grads = True, False
            for step in range(3):
                micro = batches[2 * (step % 2):2 * (step % 2) + 2]
                strategy.train_step(micro, lambda logps, b: sft_loss_from_logps(logps, b["loss_mask"], "token") / 2)
            finals[allreduce] = [p.detach().float().clone() for p in strategy.module.parameters()]
            report[f"{precision}/unused_moved"] = not bool((strategy.module.unused == 1).all())
            del strategy
        report[f"{precision}/equal"] = all(torch.equal(a, b) for a, b in zip(finals[False], finals[True]))
    out.write_text(json.dumps(report))
    topology.destroy()


@pytest.mark.distributed
def test_one_rank_zero0_skips_the_allreduce_and_trains_the_same(pairs, tmp_path):
    from tests.conftest import free_port

    data, out = tmp_path / "pairs.json", tmp_path / "report.json"
    data.write_text(json.dumps([{"chosen": p["chosen"]} for p in pairs]))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                           f"--master_port={free_port()}", __file__, "allreduce", str(data), str(out)], cwd=ROOT,
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())
    assert report == {f"{p}/{k}": True for p in ("fp32", "bf16") for k in ("default_skips", "unused_moved", "equal")}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1] == "allreduce":
        allreduce_worker(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        worker(Path(sys.argv[1]), Path(sys.argv[2]))
