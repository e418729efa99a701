"""DeepSpeed AutoTP (``parallel.tp=2`` on the deepspeed strategy) on real transformers families.

One torchrun launch of 2 processes (this file's ``__main__``) trains each family for a few steps at
TP=2 through :class:`DeepSpeedStrategy`, and each rank also trains an unsharded copy in plain PyTorch
(AdamW, clipping and LR schedule as the strategy configures them): the independent reference. The
families cover the three ways AutoTP used to break or could break:

- Qwen2 with tied embeddings (transformers' plan asks for a vocabulary-sharded head: each rank saw half
  the logits, ``IndexError: Target ... out of bounds``);
- Phi3 (fused ``qkv_proj`` and ``gate_up_proj``; transformers' plan needs ``rowwise_split_input``,
  which DeepSpeed refuses);
- Mistral, untied (the plain column/row plan and a column-parallel head with gathered logits).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"qwen2-tied": ("qwen2", True), "phi3": ("phi3", False), "mistral": ("mistral", False)}
STEPS, VOCAB = 6, 400


def tiny(arch: str, tied: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"sliding_window": None} if arch == "mistral" else {}
    config = AutoConfig.for_model(arch, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=tied, max_position_embeddings=128, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def batches(n: int, seed: int = 0) -> list[dict]:
    """One fixed [4, 24] batch (the first 6 positions masked) for every step: the model memorises it
    within a few steps, so the comparison is of a moving model, not of near-constant losses."""
    import torch

    ids = torch.randint(1, VOCAB, (4, 24), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(ids.shape)
    mask[:, :6] = 0
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1), "attention_mask": torch.ones_like(ids),
             "loss_mask": mask}
    return [batch] * n


def loss_of(logps, batch):
    return -(logps * batch["loss_mask"]).sum() / batch["loss_mask"].sum()


def worker(out: Path) -> None:
    import torch
    from omegaconf import DictConfig
    from torch.optim.lr_scheduler import LambdaLR

    from trainer.losses import token_logps
    from trainer.parallel.deepspeed import DeepSpeedStrategy, _param_groups
    from trainer.parallel.schedule import lr_multiplier
    from trainer.parallel.topology import Topology

    parallel = DictConfig({"strategy": "deepspeed", "tp": 2, "pp": 1, "cp": 1, "dp": -1, "virtual_pp": 1,
                           "sequence_parallel": False, "zero_stage": 1, "precision": "fp32",
                           "offload_optimizer": False, "activation_checkpointing": False, "device": "cpu",
                           "backend": "gloo", "timeout_minutes": 5.0})
    optim = DictConfig({"lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "grad_clip": 1.0,
                        "warmup_steps": 1, "schedule": "cosine", "min_lr_ratio": 0.1})
    topology = Topology.initialize(parallel)
    results = {}
    for name, (arch, tied) in FAMILIES.items():
        model = tiny(arch, tied)
        reference = copy.deepcopy(model)
        full = sum(p.numel() for p in model.parameters())
        strategy = DeepSpeedStrategy(parallel, topology)
        strategy.setup(model, optim, micro_batch_size=4, grad_accum=1, total_steps=STEPS)
        local = sum(p.numel() for p in strategy.module.parameters())
        opt = torch.optim.AdamW(_param_groups(reference, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas),
                                eps=optim.eps, fused=True)
        sched = LambdaLR(opt, functools.partial(lr_multiplier, total_steps=STEPS, warmup_steps=optim.warmup_steps,
                                                schedule=optim.schedule, min_lr_ratio=optim.min_lr_ratio))
        got, want = [], []
        for batch in batches(STEPS):
            info = strategy.train_step([batch], loss_of)
            got.append([float(info["loss"]), float(info["grad_norm"])])
            out_ref = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            loss = loss_of(token_logps(out_ref.logits, batch["labels"]), batch)
            opt.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), optim.grad_clip)
            opt.step()
            sched.step()
            want.append([float(loss), float(norm)])
        results[name] = {"tp2": got, "reference": want, "params_full": full, "params_local": local,
                         "tied_shared": bool(tied and strategy.module.get_input_embeddings().weight
                                             is strategy.module.get_output_embeddings().weight)}
    if topology.is_main:
        out.write_text(json.dumps(results))
    topology.destroy()


@pytest.fixture(scope="module")
def autotp_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("autotp") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    from tests.conftest import free_port

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", __file__, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.distributed
@pytest.mark.parametrize("family", list(FAMILIES))
def test_autotp_trains_like_one_unsharded_process(autotp_run, family):
    r = autotp_run[family]
    for (loss, norm), (ref_loss, ref_norm) in zip(r["tp2"], r["reference"], strict=True):
        assert abs(loss - ref_loss) <= 1e-5, (family, r)
        assert abs(norm - ref_norm) <= 1e-4, (family, r)
    assert r["reference"][-1][0] < r["reference"][0][0] - 0.05  # it learns: the comparison is not of constants


@pytest.mark.distributed
def test_autotp_really_shards(autotp_run):
    """Each rank holds fewer parameters than the model (the MLP at least is split); a tied head stays
    tied (one replicated tensor), as the loss needs full-vocabulary logits."""
    for family, r in autotp_run.items():
        assert r["params_local"] < 0.8 * r["params_full"], (family, r["params_local"], r["params_full"])
    assert autotp_run["qwen2-tied"]["tied_shared"]


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmo2"])
def test_unsupported_plans_are_refused_by_name(arch):
    from transformers import AutoConfig

    from trainer.parallel.deepspeed import autotp_section

    with pytest.raises(NotImplementedError, match=rf"^parallel\.tp: model\.arch='{arch}'.*parallel=zero3"):
        autotp_section(AutoConfig.for_model(arch), 2)


def test_supported_plans_keep_full_vocabulary_logits():
    from transformers import AutoConfig

    from trainer.parallel.deepspeed import autotp_section

    for arch in ("llama", "mistral", "qwen2"):
        assert autotp_section(AutoConfig.for_model(arch), 2) == {"autotp_size": 2, "vocab_parallel_lm_head": False}
    phi3 = autotp_section(AutoConfig.for_model("phi3"), 4)
    assert phi3["autotp_size"] == 4 and phi3["vocab_parallel_lm_head"] is False
    assert {s["partition_type"] for s in phi3["partition_config"]["layer_specs"]} == {"column", "row", "skip"}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    worker(Path(sys.argv[1]))
