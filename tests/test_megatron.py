"""The ``megatron`` strategy on gloo CPU processes, through the test-only compat layer.

Every distributed run is a subprocess (tests/megatron_worker.py, under torchrun for > 1 process)
because the compat layer patches torch process-wide. References are independent of megatron:
transformers' own logits, the HF state dict itself, and plain-PyTorch SFT and preference loops (AdamW,
clipping, the same LR schedule, the same GlobalBatchPlan batches and the stages' ``micro_batch_loss``; a
frozen copy of the initial HF model as the preference reference).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from tests.conftest import assert_tensors_close, free_port

WORKER = Path(__file__).with_name("megatron_worker.py")
TOL = 1e-5
STEPS = 6


def run_worker(mode: str, opts: dict, tmp: Path, nproc: int = 1) -> dict:
    out = tmp / f"{mode}-{uuid.uuid4().hex[:8]}.json"
    args = [str(WORKER), mode, json.dumps(opts), str(out)]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=400)
    if proc.returncode != 0:
        raise AssertionError(f"worker {mode} {opts} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def assert_trajectory(ref: list[dict], got: list[dict]) -> None:
    ref = ref[got[0]["step"] - 1:]
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for r, g in zip(ref, got):
        assert abs(r["loss"] - g["loss"]) <= TOL, (r, g)
        assert abs(r["grad_norm"] - g["grad_norm"]) <= TOL, (r, g)
        assert g["lr"] == pytest.approx(r["lr"], rel=1e-12)


def assert_weights_close(ref_path: Path, got_path: Path, tol: float = 1e-4) -> None:
    """Final HF-named weights after training; Adam amplifies float noise on near-zero gradients, so
    the bound is looser than the loss bound."""
    assert_tensors_close(torch.load(ref_path), torch.load(got_path), tol)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("megatron")


@pytest.fixture(scope="module")
def reference(work) -> dict:
    out = run_worker("reference", {"steps": STEPS, "weights": str(work / "ref.pt")}, work)
    out["weights"] = work / "ref.pt"
    return out


# ---- preference: megatron vs a plain-PyTorch loop, the preference stage's loss ------------------------
DPO_STEPS = 4
# Stage overrides, each run by the plain-PyTorch reference once; beta 0.1, sft_weight 0 unless given.
PREF_VARIANTS = {"dpo_sft": {"loss": "dpo", "sft_weight": 0.5}, "ipo_avg": {"loss": "ipo", "average_logps": True},
                 "rpo": {"loss": "rpo"}}


@pytest.fixture(scope="module")
def pref_reference(work, cache_dir) -> dict:
    return run_worker("pref_reference", {"steps": DPO_STEPS, "cache": str(cache_dir), "variants": PREF_VARIANTS},
                      work)


# Each layout is one launch: SFT steps (the ``reference`` trajectory), then the preference variants
# (``pref_reference``). The TP=2 run also writes the dist checkpoint the resume tests load.
LAYOUTS = {
    "tp2": ({"tp": 2, "save_at": 3, "save": "ckpt", "tag": "step_000003"}, 2, ["dpo_sft"]),
    "pp2, plain optimizer, activation recompute": ({"pp": 2, "dist_opt": False, "recompute": True}, 2, ["ipo_avg"]),
    "dp2, distributed optimizer": ({}, 2, ["rpo"]),
    "tp2 x pp2": ({"tp": 2, "pp": 2}, 4, ["dpo_sft", "dpo_sft/online"]),
}


@pytest.fixture(scope="module")
def layout_run(work, cache_dir):
    """name -> that layout's worker output (run once, on first use)."""
    done: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name not in done:
            opts, nproc, variants = LAYOUTS[name]
            opts = {**opts, "save": str(work / opts["save"])} if "save" in opts else opts
            weights = work / f"{uuid.uuid4().hex[:8]}.pt"
            preference = {"steps": DPO_STEPS, "cache": str(cache_dir), "variants": {
                v: {**PREF_VARIANTS[v.split("/")[0]], **({"reference_mode": "online"} if "/online" in v else {})}
                for v in variants}}
            done[name] = run_worker("train", {"steps": STEPS, "weights": str(weights), "preference": preference,
                                              **opts}, work, nproc=nproc)
            done[name]["weights"] = weights
        return done[name]
    return run


def assert_generation_matches(out: dict) -> None:
    """MegatronStrategy.generate at TP=2 (vocabulary-parallel argmax) on left-padded prompts of different
    lengths, with an EOS that ends row 0 early (padding after it, the other rows running on): the same
    tokens as transformers' greedy ``generate``."""
    assert out["got"] == out["expected"]
    row0 = out["expected"][0]
    assert row0.index(out["eos"]) < len(row0) - 1 and row0[-1] == 0  # row 0 ended early and was padded
    assert all(row[-1] != 0 for row in out["expected"][1:3])  # rows still generating at the end


# ---- HF import / export ---------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2])
def test_hf_import_matches_transformers_and_round_trips(work, tp):
    results = run_worker("convert", {"tp": tp, "export": str(work / f"export-tp{tp}"), "generate": tp == 2},
                         work, nproc=tp)
    if tp == 2:
        assert_generation_matches(results.pop("generate"))
    assert sorted(results) == ["llama-tied", "llama-untied", "nemotron-tied", "nemotron-untied", "qwen2-tied",
                               "qwen2-untied"]
    for family, r in results.items():
        assert r["local_vocab"] == 400 // tp, family  # the logits really are vocabulary-sharded
        assert r["logits_err"] <= TOL, (family, r)  # gathered megatron logits vs transformers
        assert r["logps_err"] <= TOL, (family, r)  # strategy.token_logps vs log_softmax of HF logits
        assert r["same_keys"] and r["bit_exact"], (family, r)  # full_state_dict == the HF weights
        assert r["export_logits_err"] <= 1e-6, (family, r)  # save_pretrained -> from_pretrained


# ---- training ------------------------------------------------------------------------------------
def test_reference_moves(reference):
    losses = [r["loss"] for r in reference["records"]]
    norms = [r["grad_norm"] for r in reference["records"]]
    assert len(losses) == STEPS and len(set(losses)) == STEPS and norms[0] > norms[-1]


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_match_single_process(reference, layout_run, name):
    out = layout_run(name)
    assert_trajectory(reference["records"], out["records"])
    assert out["local_loss_consistent"], "loss differs between ranks of one pipeline/tensor group"
    assert out["roundtrip_bit_exact"], "HF -> megatron -> HF full_state_dict is not bit-exact"
    assert_weights_close(reference["weights"], out["weights"])
    # A NaN loss on one micro-batch of one rank: the step is skipped and no weight moves.
    assert out["nan_step"]["skipped"] and out["nan_step"]["unchanged"], out["nan_step"]


@pytest.mark.distributed
def test_bf16_tracks_fp32_reference(reference, work):
    """bf16 weights (megatron's Float16Module + fp32 main params): close to, not equal to, fp32."""
    out = run_worker("train", {"steps": 3, "tp": 2, "precision": "bf16"}, work, nproc=2)
    for r, g in zip(reference["records"], out["records"]):
        assert abs(r["loss"] - g["loss"]) <= 2e-3 and abs(r["grad_norm"] - g["grad_norm"]) <= 2e-2, (r, g)
    assert out["local_loss_consistent"]


@pytest.mark.distributed
def test_interleaved_pipeline_matches_single_process(work):
    ref = run_worker("reference", {"steps": 2, "layers": 8}, work)
    out = run_worker("train", {"steps": 2, "layers": 8, "pp": 4, "vpp": 2}, work, nproc=4)
    assert_trajectory(ref["records"], out["records"])
    assert out["roundtrip_bit_exact"]


def test_preference_reference_closed_forms(pref_reference):
    """Step 1: the policy is the reference, so h = 0 for every pair. DPO: -log sigmoid(0) = log 2, plus
    sft_weight times the chosen NLL under the reference. IPO: (0 - 1/(2 beta))^2. RPO (bwd_kl): with
    a = 0 and b = eta * (1 - 0) = 1 (the verifier's rewards), KL(Bern(s) || Bern(1/2)) with s = sigma(1)."""
    dpo, ipo, rpo = (pref_reference[k]["records"][0] for k in ("dpo_sft", "ipo_avg", "rpo"))
    assert dpo["pref_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert dpo["sft_loss"] == pytest.approx(dpo["ref_nll_chosen"], rel=1e-6)  # the policy's NLL == the reference's
    assert dpo["loss"] == pytest.approx(math.log(2) + 0.5 * dpo["ref_nll_chosen"], rel=1e-6)
    assert ipo["loss"] == pytest.approx(1 / (4 * 0.1 ** 2), rel=1e-6)
    s = 1 / (1 + math.exp(-1))
    assert rpo["reward_gaps"] == [1.0]
    assert rpo["loss"] == pytest.approx(s * math.log(2 * s) + (1 - s) * math.log(2 * (1 - s)), rel=1e-6)
    for variant in pref_reference.values():
        losses = [r["loss"] for r in variant["records"]]
        assert len(set(losses)) == DPO_STEPS, losses  # the policy moves


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_preference_matches_plain_pytorch(pref_reference, layout_run, name):
    """Megatron (reference log-probs from a setup_inference model: the cached table, or per micro-batch
    online) equals the plain-PyTorch loop with a frozen HF reference, step by step; the cached table
    equals the frozen model's log-probs."""
    out = layout_run(name)["preference"]
    assert sorted(out) == sorted(LAYOUTS[name][2])
    for variant, got in out.items():
        ref = pref_reference[variant.split("/")[0]]
        assert got["pairs"] == ref["pairs"] >= 8
        if got["ref_table_sum"] is not None:  # cached mode
            assert got["ref_table_sum"] == pytest.approx(ref["ref_table_sum"], rel=1e-6)
        assert_trajectory(ref["records"], got["records"])


# ---- dist_checkpointing: save at TP=2, resume in other layouts ----------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("opts, nproc", [({}, 1), ({"pp": 2}, 2)], ids=["tp1", "pp2"])
def test_resume_tp2_checkpoint_in_another_layout(reference, layout_run, work, opts, nproc):
    tp2 = layout_run("tp2")  # saved the checkpoint after step 3
    out = run_worker("train", {"steps": STEPS, "load": str(work / "ckpt"), "tag": "step_000003", **opts},
                     work, nproc=nproc)
    assert [r["step"] for r in out["records"]] == [4, 5, 6]
    # Step 4 checks the weights; steps 5 and 6 the Adam moments and step count as well.
    assert_trajectory(tp2["records"], out["records"])
    assert_trajectory(reference["records"], out["records"])


# ---- refusals and guards (in-process, no megatron CUDA paths reached) -------------------------------
def _parallel(**kw) -> DictConfig:
    base = {"strategy": "megatron", "tp": 1, "pp": 1, "cp": 1, "dp": -1, "virtual_pp": 1,
            "sequence_parallel": False, "distributed_optimizer": True, "zero_stage": 0, "precision": "fp32",
            "offload_optimizer": False, "activation_checkpointing": False, "device": "cpu", "backend": "gloo"}
    return DictConfig({**base, **kw})


@pytest.mark.parametrize("overrides, key", [
    ({"cp": 2}, "parallel.cp"),
    ({"sequence_parallel": True}, "parallel.sequence_parallel"),
    ({"offload_optimizer": True}, "parallel.offload_optimizer"),
    ({"pp": 2, "virtual_pp": 2}, "parallel.virtual_pp"),
])
def test_unsupported_options_are_refused_by_name(overrides, key):
    from trainer.parallel.megatron import MegatronStrategy
    from trainer.parallel.topology import Topology

    topology = Topology(world_size=1, rank=0, local_rank=0, tp=1, pp=overrides.get("pp", 1), cp=1, dp=1,
                        device=torch.device("cpu"))
    with pytest.raises(NotImplementedError, match=key.replace(".", r"\.")):
        MegatronStrategy(_parallel(**overrides), topology)


def test_unsupported_models_are_refused_by_name():
    from transformers import AutoConfig

    from trainer.models.megatron_convert import check_supported

    with pytest.raises(NotImplementedError, match="model.config.sliding_window"):
        check_supported(AutoConfig.for_model("mistral"))  # sliding_window=4096 by default
    with pytest.raises(NotImplementedError, match="model.arch"):
        check_supported(AutoConfig.for_model("gpt2"))
    with pytest.raises(NotImplementedError, match="model.config.hidden_act"):
        check_supported(AutoConfig.for_model("nemotron", hidden_act="gelu"))
    with pytest.raises(NotImplementedError, match="model.config.mlp_bias"):  # megatron biases all linears or none
        check_supported(AutoConfig.for_model("nemotron", attention_bias=True))
    with pytest.raises(NotImplementedError, match="model.config.rope_parameters"):
        check_supported(AutoConfig.for_model("nemotron", rope_parameters={"rope_type": "linear", "factor": 2.0}))
    check_supported(AutoConfig.for_model("mistral", sliding_window=None))
    check_supported(AutoConfig.for_model("nemotron"))  # relu2, partial rotary 0.5, no biases


def test_compat_layer_refuses_another_megatron_version(monkeypatch):
    import megatron.core

    from tests import megatron_compat

    monkeypatch.setattr(megatron.core, "__version__", "0.17.0")
    with pytest.raises(megatron_compat.MegatronCompatError, match="0.16.1"):
        megatron_compat.apply()  # refuses before patching anything
    assert not megatron_compat._APPLIED
