"""Every sharded pass (SFT eval, reward eval, reference log-probs; generation accuracy and the recipe's
reward-model eval iterate the same way) makes the same number of forwards on every data-parallel rank, whatever the split of its items.

Under ZeRO-3 with partitioned weights (or tensor parallelism) each forward is a collective; a rank with
one forward fewer would leave its peers waiting in a parameter gather. Here the stand-in strategy's
forward is an all-reduce, so an unequal count is a timeout (or a mismatch), and the results are checked
against the unsharded sums.
"""

from __future__ import annotations

import datetime
import functools
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port

pytestmark = pytest.mark.distributed
N = 9  # over 2 ranks in batches of 4: 5 and 4 items, 2 and 1 batches without the guard


class CollectiveStrategy:
    """The Strategy methods the passes use; every forward joins an all-reduce, as a ZeRO-3 gather does."""

    module = None

    def __init__(self):
        self.forwards = 0
        self.packed = []  # per token_logps call: did the batch come packed (position_ids)?

    def eval(self):
        pass

    def train(self):
        pass

    def _collective(self):
        self.forwards += 1
        dist.all_reduce(torch.ones(1))

    def token_logps(self, batch):
        self._collective()
        self.packed.append("position_ids" in batch)
        return -batch["labels"].double() / 100  # a fixed function of the tokens

    def outputs(self, batch):
        self._collective()
        return batch["last_index"].double()[:, None].expand(-1, 2) / 10



def _examples():
    chat = [{"input_ids": list(range(1, 4 + i)), "assistant_mask": [0] + [1] * (2 + i)} for i in range(N)]
    pairs = [{"chosen": c, "rejected": chat[(i + 1) % N]} for i, c in enumerate(chat)]
    reward = [{"input_ids": c["input_ids"], "last_index": len(c["input_ids"]) - 1, "targets": [1.0, 2.0],
               "target_mask": [1.0, 1.0]} for c in chat]
    return chat, pairs, reward


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    from trainer.stages import reference, reward, sft

    topology = SimpleNamespace(dp_rank=rank, dp=2, dp_group=None, device=torch.device("cpu"), rank=rank,
                               world_size=2)
    chat, pairs, rewards = _examples()
    strategy = CollectiveStrategy()
    from trainer.data.chat import collate
    from trainer.data.packing import pack_examples

    found = {"sft": sft.evaluate(strategy, chat, functools.partial(collate, pad_id=0), 4, topology),
             "sft_packed": sft.evaluate(strategy, chat, functools.partial(pack_examples, max_length=16, pad_id=0), 4,
                                        topology),
             "reward": reward.evaluate(strategy, rewards, 0, 4, topology, ["a", "b"]),
             "reference": reference.pair_logps_table(strategy, pairs, 0, 4, topology)[0].tolist()}
    found["packed"] = strategy.packed
    queue.put((rank, strategy.forwards, found))
    dist.destroy_process_group()


def test_every_sharded_pass_makes_equal_forwards_and_exact_sums():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((rank, (forwards, found)) for rank, forwards, found in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # 2 forwards per pass on each rank (ceil(ceil(9 / 2) / 4)), the short rank's second a discarded stand-in.
    assert results[0][0] == results[1][0] == 8  # 4 passes: sft padded and packed, reward, reference
    assert results[0][1] == results[1][1]  # every rank holds the full, reduced numbers

    # The same numbers unsharded, in one process.
    from trainer.data.chat import collate
    from trainer.data.preference import collate_reward
    from trainer.stages.reference import pair_logps

    chat, pairs, rewards = _examples()
    batch = collate(chat, 0)
    tokens = batch["loss_mask"].sum()
    found = results[0][1]
    assert found["sft"]["eval_tokens"] == int(tokens)
    assert found["sft"]["eval_loss"] == pytest.approx((batch["labels"].double() / 100 * batch["loss_mask"]).sum().item()
                                                      / tokens.item(), rel=1e-12)
    # the packed evaluation did run on packed rows (sft, sft_packed, reference: 2 forwards each), with the same loss
    assert found["packed"] == [False, False, True, True, False, False]
    assert found["sft_packed"] == pytest.approx(found["sft"], rel=1e-12)
    scores = collate_reward(rewards, 0)["last_index"].double() / 10
    expected_mse = ((scores[:, None] - torch.tensor([1.0, 2.0], dtype=torch.float64)) ** 2).mean().item()
    assert found["reward"]["eval_mse"] == pytest.approx(expected_mse, rel=1e-12)
    from trainer.data.preference import collate_pairs

    pair_batch = collate_pairs(pairs, 0)
    c, r, n_c, n_r = pair_logps(-pair_batch["labels"].double() / 100, pair_batch, average=False)
    assert torch.allclose(torch.tensor(found["reference"], dtype=torch.float64), torch.stack([c, r, n_c, n_r], 1))
