"""``stagecraft plan``: the memory estimator against real models and measured CPU steps, the fake-process-
group layout check, the refusals, the cluster recipes, and the comparison with Megatron-Bridge's formula."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from trainer.config import CONFIG_DIR, ConfigError
from trainer.launch import plan
from trainer.launch.memory import GIB, Layout, ModelShape, estimate, hf_layer_bytes, megatron_layer_bytes
from trainer.losses import token_logps

RECIPES = ["sft-llama3-8b-1n8g-zero3", "dpo-llama3-70b-4n8g-zero3", "align-nemotron4-340b-48n8g-tp8pp12"]


def tiny_config(arch: str, h: int = 64, ffn: int = 160, layers: int = 2, heads: int = 4, kv: int = 2, vocab: int = 400,
                tied: bool = False):
    extra = {"sliding_window": None} if arch == "mistral" else {"hidden_act": "relu2"} if arch == "nemotron" else {}
    return AutoConfig.for_model(arch, vocab_size=vocab, hidden_size=h, intermediate_size=ffn, num_hidden_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                                max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


def model_yaml(name: str):
    y = OmegaConf.load(Path(CONFIG_DIR) / "model" / f"{name}.yaml")
    return AutoConfig.for_model(y.arch, **OmegaConf.to_container(y.config))


# ---- parameter counts ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, billions", [("llama3_8b", 8.03), ("llama3_70b", 70.55), ("nemotron4_340b", 341.03)])
def test_parameter_count_equals_the_model_built_by_transformers(name, billions):
    config = model_yaml(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    count = ModelShape.from_hf_config(config).total_params()
    assert count == sum(p.numel() for p in model.parameters())
    assert round(count / 1e9, 2) == billions  # the published sizes


@pytest.mark.parametrize("arch, tied", [("qwen2", True), ("phi3", False), ("mistral", False), ("nemotron", True)])
def test_parameter_count_of_other_families(arch, tied):
    config = tiny_config(arch, tied=tied)
    model = AutoModelForCausalLM.from_config(config)
    assert ModelShape.from_hf_config(config).total_params() == sum(p.numel() for p in model.parameters())


# ---- activations: what autograd saves ------------------------------------------------------------
def saved_bytes(config, dtype, rows: int = 3, seq: int = 48) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (parameters excluded)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    ids = torch.randint(0, config.vocab_size, (rows, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logps(model(input_ids=ids, use_cache=False).logits, torch.roll(ids, -1, 1))
    return sum(seen.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3", "nemotron"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [{}, {"ffn": 320, "kv": 4}, {"heads": 8, "kv": 4}])
def test_layer_activation_formula_equals_saved_tensors(arch, dtype, shape):
    """One layer's saved bytes per token (a 2-layer minus a 1-layer model) equal ``hf_layer_bytes``:
    exactly for the RMSNorm families, within 0.5 % for Nemotron (its LayerNorm1P saves weight + 1,
    a per-layer constant that is not per token)."""
    tokens = 3 * 48
    per_layer = (saved_bytes(tiny_config(arch, layers=2, **shape), dtype)
                 - saved_bytes(tiny_config(arch, layers=1, **shape), dtype)) / tokens
    formula = hf_layer_bytes(ModelShape.from_hf_config(tiny_config(arch, **shape)), 2 if dtype == torch.bfloat16 else 4)
    assert formula == pytest.approx(per_layer, rel=5e-3 if arch == "nemotron" else 1e-12)


# ---- the whole estimate against a measured CPU step ----------------------------------------------
def measured_step(config, rows: int, seq: int, recompute: bool, accum: int) -> tuple[int, int]:
    """(bytes alive before the step: weights + AdamW state, peak bytes during one optimizer step of
    ``accum`` micro-batches). The peak is that baseline plus the running maximum of the allocations
    torch's profiler records (profile_memory=True) over the step; the baseline is summed from the live
    tensors' storages."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    if recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, config.vocab_size, (rows, seq))

    def step():
        for _ in range(accum):
            (-token_logps(model(input_ids=ids, use_cache=False).logits, torch.roll(ids, -1, 1)).mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW's state exists from here on
    tensors = [*model.parameters(), *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]
    baseline = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return baseline, baseline + peak


@pytest.mark.parametrize("case", [
    {"arch": "llama"}, {"arch": "qwen2", "tied": True, "vocab": 4096}, {"arch": "llama", "recompute": True},
    {"arch": "mistral", "accum": 2}, {"arch": "llama", "accum": 2, "recompute": True},
])
def test_estimate_matches_measured_cpu_peak(case):
    """fp32, ZeRO-0, 1 process: the estimate's persistent part equals the live tensors exactly (4 + 8 bytes
    per parameter: weights and AdamW's moments; plus AdamW's step counters, 4 bytes per tensor), and the
    peak is within 0.1 % of the measured one (measured -0.05 to -0.08 %); with recompute it is above it
    by 1.8-2.9 % (measured at sequence 128 to 256), or within 0.3 % when gradients are also accumulated
    over micro-batches (measured -0.14 to -0.22 %)."""
    case = dict(case)
    recompute, accum = case.pop("recompute", False), case.pop("accum", 1)
    config = tiny_config(**{"h": 128, "ffn": 352, "layers": 4, "vocab": 1024, **case})
    rows, seq = 4, 128
    baseline, peak = measured_step(config, rows, seq, recompute, accum)
    est = estimate(ModelShape.from_hf_config(config), Layout(strategy="deepspeed", precision="fp32", rows=rows,
                                                             seq_len=seq, recompute=recompute, micro_batches=accum))
    steps = 4 * sum(1 for _ in AutoModelForCausalLM.from_config(config).parameters())
    assert est.weights + est.optimizer + steps == baseline
    if recompute:  # the kept layer inputs are counted whole until the last layer's backward
        assert -0.005 <= est.total / peak - 1 <= 0.04
    else:
        assert est.total == pytest.approx(peak, rel=1e-3)


# ---- layout checks on a fake process group -------------------------------------------------------
def test_fake_process_group_builds_1536_ranks():
    parallel = OmegaConf.create({"tp": 8, "pp": 12, "cp": 1, "virtual_pp": 1})
    started = time.perf_counter()
    check = plan.build_groups(parallel, world=1536, nproc_per_node=8)
    seconds = time.perf_counter() - started
    assert check.counts == {"tp": 192, "pp": 128, "dp": 96, "cp": 1536}
    assert check.probed == [0, 772, 1535] and check.notes == []
    assert check.seconds < 5 and seconds < 20  # ~0.1 s per build here; 4 builds in all


def test_tensor_groups_across_nodes_are_flagged():
    check = plan.build_groups(OmegaConf.create({"tp": 8, "pp": 1, "cp": 1, "virtual_pp": 1}), world=16,
                              nproc_per_node=4, probes=0)
    assert "2 tensor-parallel groups span nodes" in check.notes[0] and "cluster.nproc_per_node" in check.notes[0]


BIG = ["model=nemotron4_340b", "parallel.strategy=megatron", "parallel.precision=bf16", "data.max_length=4096",
       "stage.micro_batch_size=1", "stage.global_batch_size=128"]


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=5", "cluster.nproc_per_node=5"], r"^parallel\.tp: 5 does not divide model\.config\.num_attention_heads=96"),
    (["parallel.tp=16", "cluster.nproc_per_node=16"], r"^parallel\.tp: 16 does not divide model\.config\.num_key_value_heads=8"),
    (["parallel.tp=8", "parallel.pp=7", "cluster.nnodes=7", "cluster.nproc_per_node=8"],
     r"^parallel\.pp: pp \* virtual_pp = 7 \* 1 = 7 does not divide model\.config\.num_hidden_layers=96"),
    (["parallel.tp=8", "parallel.pp=12", "cluster.nnodes=11", "cluster.nproc_per_node=8"],
     r"^parallel\.tp\*pp\*cp = 8\*12\*1 = 96 does not divide the world size 88"),
    (["parallel.tp=8", "parallel.pp=12", "cluster.nnodes=24", "cluster.nproc_per_node=8", "stage.global_batch_size=101"],
     r"^stage\.global_batch_size: 101 must be a multiple of stage\.micro_batch_size \* dp = 1 \* 2 = 2"),
    (["parallel.tp=8", "cluster.nproc_per_node=8", "model.config.vocab_size=256001"],
     r"^parallel\.tp: 8 does not divide the vocabulary \(256001\); .* does not pad it to 256008"),
])
def test_invalid_layouts_are_refused_naming_the_key(overrides, message):
    cfg = plan.compose([*BIG, *overrides])
    with pytest.raises(ConfigError, match=message):
        plan.make_plan(cfg, groups=False)


def test_autotp_families_are_checked_by_the_planner():
    cfg = plan.compose(["model.arch=qwen2_moe", "parallel=tp2", "cluster.nproc_per_node=2"])
    with pytest.raises(ConfigError, match=r"^parallel\.tp: model\.arch='qwen2_moe' cannot use DeepSpeed AutoTP"):
        plan.make_plan(cfg, groups=False)


# ---- cluster recipes -----------------------------------------------------------------------------
def recipe_comment_estimates(name: str) -> dict[str, float]:
    text = (Path(CONFIG_DIR) / "recipe" / f"{name}.yaml").read_text()
    line = text.split("# Planner estimate per GPU")[1].splitlines()[1]
    return {stage: float(value) for stage, value in re.findall(r"(\w+) (\d+\.\d)", line)}


@pytest.mark.parametrize("name", RECIPES)
def test_cluster_recipe_validates_fits_and_states_the_planners_estimate(name, capsys):
    cfg = plan.compose([f"recipe={name}"])
    assert cfg.run.name == name
    result = plan.make_plan(cfg, groups=False)
    totals = {sp.name: round(sp.estimate.total / GIB, 1) for sp in result.stages}
    assert totals == recipe_comment_estimates(name)
    assert max(totals.values()) <= 80 * 0.9
    assert plan.main([f"recipe={name}", "--gpu-memory", "80"]) == 0  # groups built too
    out = capsys.readouterr().out
    assert "DOES NOT FIT" not in out and f"groups: built on a fake process group for {result.world} ranks" in out


def test_nemotron_recipe_is_the_papers_layout():
    cfg = plan.compose(["recipe=align-nemotron4-340b-48n8g-tp8pp12"])
    p = cfg.parallel
    assert (p.strategy, p.tp, p.pp, plan.world_size(cfg)) == ("megatron", 8, 12, 384)
    assert cfg.data.max_length == 4096 and cfg.model.arch == "nemotron"


def test_a_layout_that_does_not_fit_exits_2(capsys):
    code = plan.main(["recipe=dpo-llama3-70b-4n8g-zero3", "parallel.activation_checkpointing=false"])
    assert code == 2 and "DOES NOT FIT" in capsys.readouterr().out


def test_search_ranks_layouts_that_fit(capsys):
    overrides = ["model=llama3_70b", "cluster.nnodes=4", "cluster.nproc_per_node=8", "stage=dpo",
                 "data.max_length=2048", "stage.micro_batch_size=1", "stage.global_batch_size=128",
                 "parallel.precision=bf16"]
    ranked = plan.search(plan.compose(overrides), 80, 0.1)
    layouts = [(p.strategy, p.tp, p.pp, p.zero_stage, p.activation_checkpointing) for _, p, _ in ranked]
    assert layouts[0] == ("megatron", 8, 2, 0, False)  # no recompute, smallest bubble first
    assert ("deepspeed", 1, 1, 3, True) in layouts  # the recipe's own layout fits
    assert ("deepspeed", 1, 1, 3, False) not in layouts  # 121.6 GiB of activations
    assert all(worst <= 72 * GIB for _, _, worst in ranked)
    assert plan.main([*overrides, "--search", "--top", "3"]) == 0
    assert "1. megatron tp=8 pp=2 dp=2" in capsys.readouterr().out


# ---- Megatron-Bridge --------------------------------------------------------------------------------
def bridge(shape: ModelShape, tp: int, pp: int, dp: int, seq: int, mbs: int, microbatches: int):
    """Megatron-Bridge's theoretical_memory_utils (weights + optimizer, and activations under sequence
    parallelism and selective recompute, for the first pipeline stage), transcribed: bytes."""
    h, layers, ffn, v = shape.hidden, shape.layers, shape.ffn, shape.vocab
    gated = 1.5 if shape.gated else 1.0
    ratio = shape.heads * shape.head_dim / h
    layer_params = 2 * layers * h * h * ((1 + shape.kv_heads / shape.heads) * ratio + ffn / h * gated
                                         + 2 / h + 1 / (layers * h))
    most_loaded = (layer_params / pp + h * v) / tp
    weights_and_optimizer = most_loaded * (6 + 12 / dp)
    act = seq * mbs * h * (18 + 4 * ffn / h) * layers
    act += 8 * seq * mbs * pp + seq * mbs * h * pp
    act *= min(1, microbatches / pp)
    return weights_and_optimizer, act / tp


def test_megatron_bridge_comparison_nemotron4_340b():
    """Nemotron-4-340B, TP8 x PP12 x DP4, seq 4096, micro-batch 1, 32 micro-batches: weights + optimizer
    within 0.1 % of Megatron-Bridge's (its count folds the final norm into every stage; ours has it
    on the last). Activations (sequence parallel, no full recompute): Megatron-Bridge counts K and V
    as h wide each (its TODO: no GQA) and a per-stage embedding term; with KV heads = heads our
    per-layer term is exactly its 18 + 4F/h, with the model's 8 KV heads it is 10.8 % lower
    (total 59.5 GiB vs Megatron-Bridge's 62.7 GiB)."""
    shape = ModelShape.from_hf_config(model_yaml("nemotron4_340b"))
    layout = Layout(strategy="megatron", tp=8, pp=12, dp=4, precision="bf16", sequence_parallel=True, rows=1,
                    seq_len=4096, micro_batches=32)
    ours = estimate(shape, layout)
    assert ours.stage == "first"
    theirs_states, theirs_act = bridge(shape, 8, 12, 4, 4096, 1, 32)
    assert ours.weights + ours.gradients + ours.optimizer == pytest.approx(theirs_states, rel=1e-3)
    assert round(theirs_states / GIB, 1) == 33.9
    no_gqa = ModelShape(**{**shape.__dict__, "kv_heads": shape.heads})
    assert megatron_layer_bytes(no_gqa, 2, 1, True, True, 4096) == (18 + 4 * shape.ffn / shape.hidden) * shape.hidden
    gqa = megatron_layer_bytes(shape, 2, 8, True, True, 4096) / megatron_layer_bytes(no_gqa, 2, 8, True, True, 4096)
    assert gqa == pytest.approx(0.892, abs=1e-3)
    assert ours.activations / theirs_act == pytest.approx(0.889, abs=1e-3)
    assert round(ours.total / GIB, 1) == 59.5 and round((theirs_states + theirs_act) / GIB, 1) == 62.7
    assert round(ours.activations / GIB, 1) == 25.6 and round(theirs_act / GIB, 1) == 28.8
