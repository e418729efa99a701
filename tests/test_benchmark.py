"""stage=benchmark: the FLOP count against a hand count, and the reported numbers against each other and
across strategies (same weights, same random batch: the same losses)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from tests.conftest import MEGATRON_CLI, run_stagecraft
from trainer.stages.benchmark import flops_per_token, matmul_parameters

# hidden 64, 2 layers, 4 heads of 16, 2 KV heads, SwiGLU 128, vocabulary 400 (the TINY overrides)
BENCH = ["stage=benchmark", "stage.seq_length=32", "stage.vocab_size=400", "stage.global_batch_size=4",
         "stage.micro_batch_size=2", "stage.untimed_steps=1", "stage.timed_steps=2"]


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_by_hand(tied):
    config = AutoConfig.for_model("llama", vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config)
    # Per layer: q and o 64x64, k and v 64x32 (2 KV heads of 16), gate/up/down 64x128, two norms of 64.
    layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    matmul = 2 * layer + 64 + 400 * 64  # + the final norm, + the LM head (tied: the embedding, counted once)
    assert matmul_parameters(model) == matmul
    # 6 N, plus QK^T and AV over the full 32 x 32 matrix: 2 * 32 * 64 FLOPs each, per layer, x3 for backward.
    assert flops_per_token(matmul, config, 32) == 6 * matmul + 2 * 3 * (2 + 2) * 32 * 64


@pytest.mark.distributed
def test_benchmark_reports_consistent_numbers_on_both_strategies(tmp_path, cache_dir):
    one, two = tmp_path / "deepspeed", tmp_path / "megatron"
    run_stagecraft(one, BENCH, cache_dir)
    run_stagecraft(two, [*BENCH, "parallel=megatron_tp2pp2", "parallel.pp=1"], cache_dir, nproc=2, script=MEGATRON_CLI)
    results = [json.loads((run / "stages/benchmark/benchmark.json").read_text()) for run in (one, two)]
    config = OmegaConf.load(one / "stages/benchmark/config.yaml").model.config
    hf = AutoConfig.for_model("llama", vocab_size=400, **OmegaConf.to_container(config))
    for r in results:
        assert r["timed_steps"] == 2 and len(r["losses"]) == 3
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(4 * 32)  # one global batch per step
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / r["world_size"])
        flops = flops_per_token(r["matmul_parameters"], hf, 32)
        assert r["model_tflops_per_device"] == pytest.approx(flops * r["tokens_per_s_per_device"] / 1e12)
        assert r["mfu"] == pytest.approx(r["model_tflops_per_device"] / 989.0)
        assert r["peak_host_memory_gib"] > 0
    assert results[0]["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    assert results[1]["layout"] == {"tp": 2, "pp": 1, "dp": 1} and results[1]["strategy"] == "megatron"
    assert results[0]["parameters"] == results[1]["parameters"]
    # The same seeded weights and random batch: the same SFT step on either strategy.
    assert results[1]["losses"] == pytest.approx(results[0]["losses"], abs=1e-5)
    assert results[0]["losses"][-1] < results[0]["losses"][0]
