"""Worker for tests/test_megatron.py, run with torchrun (or plain python for 1 process).

    python tests/megatron_worker.py <mode> <json options> <out.json>

Modes:
  convert    megatron logits / log-probs vs transformers on the same weights, and the HF -> megatron -> HF
             round trip of ``full_state_dict``, for several tiny model families in this layout; with
             "generate", also greedy generation vs transformers' ``generate``.
  train      SFT steps through MegatronStrategy (GlobalBatchPlan micro-batches, the stage's
             ``micro_batch_loss``), optionally saving at / resuming from a dist checkpoint; with
             "preference", then the ``dpo`` mode's steps in the same layout.
  reference  the same SFT steps in plain PyTorch on the HF model (1 process): the independent reference.
  dpo        preference steps (the preference stage's ``micro_batch_loss``; loss dpo | ipo | rpo,
             sft_weight, average_logps, reference_mode from each of ``opts["variants"]``) on tiny synthetic
             pairs, with reference log-probs from a forward-only ``setup_inference`` model of the same
             weights: a cached table (pair_logps_table + attach), or per micro-batch when online.
  pref_reference  the same preference steps in plain PyTorch (1 process, a frozen copy of the initial HF
             model as the reference), for each of ``opts["variants"]``: the independent reference.

Applies the test-only CPU compatibility layer for megatron-core first.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import megatron_compat  # noqa: E402

megatron_compat.apply()

import torch.distributed as dist  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from trainer.data.chat import collate  # noqa: E402
from trainer.data.sampler import GlobalBatchPlan  # noqa: E402
from trainer.losses import token_logps  # noqa: E402
from trainer.parallel.schedule import lr_multiplier  # noqa: E402
from trainer.stages.common import all_reduce_sum  # noqa: E402
from trainer.stages.sft import micro_batch_loss  # noqa: E402

VOCAB, PAD = 400, 0
OPTIM = DictConfig({"lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "grad_clip": 1.0,
                    "warmup_steps": 2, "schedule": "cosine", "min_lr_ratio": 0.1})


def tiny_model(arch: str, tied: bool, layers: int, seed: int = 0) -> torch.nn.Module:
    family = {}
    if arch == "nemotron":
        # Half of each head rotated; an eps large enough that a mapping ignoring norm_eps fails the 1e-5
        # bound; the tied variant also has every linear bias (attention_bias = mlp_bias, as megatron needs).
        family = {"hidden_act": "relu2", "partial_rotary_factor": 0.5, "norm_eps": 1e-3,
                  "attention_bias": tied, "mlp_bias": tied}
    config = AutoConfig.for_model(arch, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=tied, max_position_embeddings=128, **family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():  # non-trivial norms and biases, so a mapping that drops them shows
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.3)
    model.config.use_cache = False
    return model


def examples(n: int, seed: int) -> list[dict]:
    """Chat-like token sequences of varied length with a prompt/response mask (as tokenize_chat makes)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(8, 40, (1,), generator=g))
        prompt = int(torch.randint(2, length - 2, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "assistant_mask": [0] * prompt + [1] * (length - prompt)})
    return out


def parallel_config(opts: dict) -> DictConfig:
    return DictConfig({"strategy": "megatron", "tp": opts.get("tp", 1), "pp": opts.get("pp", 1), "cp": 1,
                       "dp": -1, "virtual_pp": opts.get("vpp", 1), "sequence_parallel": False,
                       "distributed_optimizer": opts.get("dist_opt", True), "zero_stage": 0,
                       "precision": opts.get("precision", "fp32"), "offload_optimizer": False,
                       "activation_checkpointing": opts.get("recompute", False), "device": "cpu", "backend": "gloo",
                       "timeout_minutes": 30.0})


def batch_for(ids: torch.Tensor) -> dict:
    return {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1), "attention_mask": torch.ones_like(ids),
            "loss_mask": torch.ones(ids.shape)}


def run_convert(opts: dict, topology) -> dict:
    """For each family: max |logps - HF logps|, max |gathered logits - HF logits|, round-trip exactness."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from trainer.parallel.megatron import MegatronStrategy

    results = {}
    for arch, tied in (("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True), ("nemotron", False),
                       ("nemotron", True)):
        hf = tiny_model(arch, tied, layers=opts.get("layers", 2)).eval()
        reference = {k: v.clone() for k, v in hf.state_dict().items()}
        ids = torch.randint(1, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))
        batch = batch_for(ids)
        with torch.no_grad():
            ref_logits = hf(input_ids=ids).logits
        strategy = MegatronStrategy(parallel_config(opts), topology)
        strategy.setup(hf, OPTIM, micro_batch_size=2, grad_accum=2, total_steps=1)
        strategy.eval()
        logps = strategy.token_logps(batch)
        entry = {"logps_err": (logps - token_logps(ref_logits, batch["labels"])).abs().max().item()}
        if topology.pp == 1:
            with torch.no_grad():
                positions = torch.arange(24).unsqueeze(0).expand(2, -1)
                local = strategy.chunks[0](ids, positions, None)
                full = gather_from_tensor_model_parallel_region(local)
            entry["logits_err"] = (full - ref_logits).abs().max().item()
            entry["local_vocab"] = local.shape[-1]
        state = strategy.full_state_dict()
        if state is not None:
            if tied:
                reference.pop("lm_head.weight", None)
            entry["same_keys"] = sorted(state) == sorted(reference)
            entry["bit_exact"] = entry["same_keys"] and all(torch.equal(state[k], reference[k]) for k in reference)
            if opts.get("export"):  # save_pretrained through the HF shell, reload with plain transformers
                out = Path(opts["export"]) / f"{arch}-{int(tied)}"
                strategy.module.save_pretrained(out, state_dict=state, safe_serialization=True)
                reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
                with torch.no_grad():
                    entry["export_logits_err"] = (reloaded(input_ids=ids).logits - ref_logits).abs().max().item()
        results[f"{arch}-{'tied' if tied else 'untied'}"] = entry
    if opts.get("generate"):  # in the same launch: a launch costs more than the whole check
        results["generate"] = run_generate(opts, topology)
    return results


def sft_setup(opts: dict, dp: int):
    data = examples(opts.get("examples", 48), seed=3)
    plan = GlobalBatchPlan(len(data), opts.get("gbs", 8), opts.get("mbs", 2), dp, seed=11)
    return data, plan


def run_train(opts: dict, topology) -> dict:
    from trainer.parallel.megatron import MegatronStrategy

    data, plan = sft_setup(opts, topology.dp)
    steps = opts["steps"]
    strategy = MegatronStrategy(parallel_config(opts), topology)
    model = tiny_model("qwen2", True, layers=opts.get("layers", 4))
    initial = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    strategy.setup(model, OPTIM, plan.micro_batch_size, plan.grad_accum, steps)
    state = strategy.full_state_dict()
    roundtrip = None if state is None else (
        sorted(state) == sorted(initial) and all(torch.equal(state[k], initial[k]) for k in initial))
    start = 0
    if opts.get("load"):
        start = strategy.load(Path(opts["load"]), opts["tag"])["step"]
    strategy.train()
    records = []
    for step in range(start, steps):
        batches = [collate([data[i] for i in ids], PAD) for ids in plan.micro_batches(step, topology.dp_rank)]
        targets = all_reduce_sum(sum(b["loss_mask"].sum() for b in batches), topology.dp_group).float()
        info = strategy.train_step(batches, lambda logps, batch: micro_batch_loss(
            logps, batch, "token", targets, plan.global_batch_size))
        loss = all_reduce_sum(info["loss"], topology.dp_group).item()
        records.append({"step": step + 1, "loss": loss, "grad_norm": info["grad_norm"], "lr": info["lr"],
                        "local_loss": info["loss"].item()})
        if opts.get("save_at") == step + 1:
            strategy.save(Path(opts["save"]), opts["tag"], {"step": step + 1})
    # Every rank of a pipeline/tensor group must report the same local loss (the broadcast contract).
    mine = torch.tensor([r["local_loss"] for r in records], dtype=torch.float64)
    gathered = [torch.empty_like(mine) for _ in range(topology.world_size)]
    dist.all_gather(gathered, mine)
    by_dp = {}
    for rank, losses in enumerate(gathered):
        by_dp.setdefault(rank_dp(rank, topology), []).append(losses)
    consistent = all(all(torch.equal(x, group[0]) for x in group) for group in by_dp.values())
    final = strategy.full_state_dict()
    if final is not None and opts.get("weights"):
        torch.save(final, opts["weights"])
    out = {"records": records, "local_loss_consistent": consistent, "roundtrip_bit_exact": roundtrip,
           "nan_step": nan_step(strategy, data, plan, steps, topology, final)}
    if opts.get("preference"):  # preference steps in the same layout and launch (a launch costs more)
        layout = {k: opts[k] for k in ("tp", "pp", "vpp", "dist_opt", "recompute", "precision") if k in opts}
        out["preference"] = run_dpo({**layout, **opts["preference"]}, topology)
    return out


def nan_step(strategy, data, plan, step: int, topology, before: dict | None) -> dict:
    """One more step whose loss is NaN on data-parallel rank 0 only: it must be skipped on every rank
    (the poisoned gradient reaches all of them through the reductions) and leave every weight as it
    was."""
    batches = [collate([data[i] for i in ids], PAD) for ids in plan.micro_batches(step, topology.dp_rank)]

    def loss_fn(logps, batch):
        loss = -(logps * batch["loss_mask"]).sum() / plan.global_batch_size
        return loss * float("nan") if topology.dp_rank == 0 else loss

    info = strategy.train_step(batches, loss_fn)
    after = strategy.full_state_dict()
    unchanged = None if before is None else all(torch.equal(before[k], after[k]) for k in before)
    return {"skipped": info["skipped"], "unchanged": unchanged, "grad_norm": info["grad_norm"]}


def pref_setup(opts: dict, dp: int):
    """The preference stage config (``loss``, ``beta``, ``sft_weight``, ``average_logps``,
    ``reference_mode`` from ``opts``), the tokenised synthetic pairs (with the verifier's rewards, which
    rpo reads), the pad id and the batch plan."""
    from omegaconf import OmegaConf

    from trainer.config.schema import PreferenceStageConfig
    from trainer.data import build_embedded_tokenizer
    from trainer.data.preference import synthetic_preference_records, tokenize_pair

    overrides = {k: opts[k] for k in ("loss", "beta", "sft_weight", "average_logps", "reference_mode") if k in opts}
    stage = OmegaConf.merge(OmegaConf.structured(PreferenceStageConfig), {"beta": 0.1}, overrides)
    tok = build_embedded_tokenizer(VOCAB, opts["cache"])
    records = synthetic_preference_records(opts.get("pairs", 16), seed=5, families=["reverse", "sort", "upper"])
    pairs = [p for p in (tokenize_pair(tok, r, 48) for r in records) if p is not None]
    plan = GlobalBatchPlan(len(pairs), opts.get("gbs", 4), opts.get("mbs", 2), dp, seed=11)
    return stage, pairs, tok.pad_token_id, plan


def run_dpo(opts: dict, topology) -> dict:
    """Megatron preference steps, one result per variant in ``opts["variants"]`` (option overrides), all
    in this launch's layout (a launch costs far more than a variant)."""
    return {name: _dpo({**opts, **variant}, topology) for name, variant in opts["variants"].items()}


def _dpo(opts: dict, topology) -> dict:
    """Preference steps as the preference stage runs them: reference log-probs from a ``setup_inference``
    model (a cached table via pair_logps_table + attach, or ``token_logps`` per micro-batch for
    ``reference_mode=online``, as the stage's loop does), then train_step with the stage's
    ``micro_batch_loss``."""
    from trainer.data.preference import collate_pairs
    from trainer.parallel.megatron import MegatronStrategy
    from trainer.stages import preference, reference

    stage, pairs, pad, plan = pref_setup(opts, topology.dp)
    mbs, steps, layers = plan.micro_batch_size, opts["steps"], opts.get("layers", 2)
    online = stage.reference_mode == "online"
    ref = MegatronStrategy(parallel_config(opts), topology)
    ref.setup_inference(tiny_model("qwen2", True, layers=layers), mbs)
    table_sum = None
    if not online:
        table, _ = reference.pair_logps_table(ref, pairs, pad, mbs, topology)
        pairs = reference.attach(pairs, table, stage.average_logps)
        table_sum = table[:, :2].sum().item()
        del ref

    strategy = MegatronStrategy(parallel_config(opts), topology)
    strategy.setup(tiny_model("qwen2", True, layers=layers), OPTIM, mbs, plan.grad_accum, steps)
    strategy.train()
    records_out = []
    for step in range(steps):
        batches = [collate_pairs([pairs[i] for i in ids], pad) for ids in plan.micro_batches(step, topology.dp_rank)]
        if online:
            with torch.no_grad():
                for batch in batches:
                    batch["ref_chosen"], batch["ref_rejected"], _, _ = reference.pair_logps(
                        ref.token_logps(batch), batch, stage.average_logps)
        sums: dict = {}
        info = strategy.train_step(batches, lambda logps, batch: preference.micro_batch_loss(
            logps, batch, stage, plan.global_batch_size, sums))
        loss = all_reduce_sum(info["loss"], topology.dp_group).item()
        records_out.append({"step": step + 1, "loss": loss, "grad_norm": info["grad_norm"], "lr": info["lr"]})
    return {"records": records_out, "pairs": len(pairs), "ref_table_sum": table_sum}


def plain_adamw(model: torch.nn.Module, steps: int):
    """The plain-PyTorch references' optimizer: AdamW with decay on >= 2-D params only, and the LR multiplier."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIM.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=OPTIM.lr,
                                  betas=tuple(OPTIM.betas), eps=OPTIM.eps)
    schedule = functools.partial(lr_multiplier, total_steps=steps, warmup_steps=OPTIM.warmup_steps,
                                 schedule=OPTIM.schedule, min_lr_ratio=OPTIM.min_lr_ratio)
    return optimizer, schedule


def plain_update(model, optimizer, schedule, step: int, loss: torch.Tensor) -> tuple[float, float]:
    """The plain-PyTorch references' update: backward, clip at OPTIM.grad_clip, scheduled LR, AdamW step; returns
    the pre-clip grad norm and the LR."""
    optimizer.zero_grad()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip).item()
    lr = OPTIM.lr * schedule(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return grad_norm, lr


def run_pref_reference(opts: dict) -> dict:
    """Plain-PyTorch preference steps, one result per variant in ``opts["variants"]`` (option overrides)."""
    return {name: _pref_reference({**opts, **variant}) for name, variant in opts["variants"].items()}


def _pref_reference(opts: dict) -> dict:
    """The HF model on each whole global batch (chosen and rejected rows in one forward), reference
    log-probs from a frozen copy of the initial model (``sequence_logps``, not the stage's
    pair_logps), the stage's ``micro_batch_loss`` and run_reference's optimizer."""
    from trainer.data.preference import collate_pairs
    from trainer.losses import sequence_logps
    from trainer.stages import preference

    stage, pairs, pad, plan = pref_setup(opts, dp=1)
    steps, gbs = opts["steps"], plan.global_batch_size
    model = tiny_model("qwen2", True, layers=opts.get("layers", 2))
    frozen = copy.deepcopy(model).requires_grad_(False)
    optimizer, schedule = plain_adamw(model, steps)

    def frozen_logps(batch: dict, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            seq = sequence_logps(frozen(input_ids=batch["input_ids"]).logits, batch["labels"], batch["loss_mask"],
                                 average)
        n = seq.shape[0] // 2
        return seq[:n], seq[n:]

    table_sum = sum(x.sum() for x in frozen_logps(collate_pairs(pairs, pad), average=False)).item()
    records = []
    for step in range(steps):
        batch = collate_pairs([pairs[i] for i in plan.global_batch(step)], pad)
        batch["ref_chosen"], batch["ref_rejected"] = frozen_logps(batch, stage.average_logps)
        sums: dict = {}
        logps = token_logps(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        loss = preference.micro_batch_loss(logps, batch, stage, gbs, sums)  # the whole batch: its share is 1
        grad_norm, lr = plain_update(model, optimizer, schedule, step, loss)
        records.append({"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm, "lr": lr,
                        "pref_loss": sums["pref_loss"].item() / gbs, "sft_loss": sums["sft_loss"].item() / gbs,
                        "ref_nll_chosen": -batch["ref_chosen"].mean().item(),
                        "reward_gaps": sorted(set((batch["chosen_reward"] - batch["rejected_reward"]).tolist()))})
    return {"records": records, "pairs": len(pairs), "ref_table_sum": table_sum}


def run_generate(opts: dict, topology) -> dict:
    """Greedy generation of left-padded prompts: MegatronStrategy.generate vs transformers' generate
    on the same weights; EOS is a token row 0 emits early, so rows end at different steps."""
    from trainer.parallel.megatron import MegatronStrategy

    lengths = [5, 12, 9, 3]
    g = torch.Generator().manual_seed(21)
    ids = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[row, -n:] = 1
    hf = tiny_model("llama", False, layers=opts.get("layers", 2)).eval()

    def hf_generate(eos: int, new: int) -> torch.Tensor:
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                               eos_token_id=eos, pad_token_id=PAD)

    new = opts.get("new_tokens", 12)
    eos = int(hf_generate(VOCAB - 1, new)[0, max(lengths) + 2])  # row 0's third token
    expected = hf_generate(eos, new)
    strategy = MegatronStrategy(parallel_config(opts), topology)
    strategy.setup_inference(tiny_model("llama", False, layers=opts.get("layers", 2)), len(lengths))
    got = strategy.generate(ids, mask, new, eos, PAD)
    return {"expected": expected.tolist(), "got": got.tolist(), "eos": eos}


def rank_dp(rank: int, topology) -> int:
    """The data-parallel index of global rank ``rank`` under megatron's default order (tp-cp-ep-dp-pp)."""
    return (rank // topology.tp) % topology.dp


def run_reference(opts: dict) -> dict:
    """Plain PyTorch: HF model, AdamW (decay on >= 2-D params), clip, the same LR schedule and batches."""
    data, plan = sft_setup(opts, dp=1)
    steps = opts["steps"]
    model = tiny_model("qwen2", True, layers=opts.get("layers", 4))
    optimizer, schedule = plain_adamw(model, steps)
    records = []
    for step in range(steps):
        batch = collate([data[i] for i in plan.global_batch(step)], PAD)
        logps = token_logps(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        loss = micro_batch_loss(logps, batch, "token", batch["loss_mask"].sum(), plan.global_batch_size)
        grad_norm, lr = plain_update(model, optimizer, schedule, step, loss)
        records.append({"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm, "lr": lr})
    if opts.get("weights"):
        torch.save({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, opts["weights"])
    return {"records": records}


def main() -> None:
    mode, opts, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    if mode in ("reference", "pref_reference"):
        result = (run_reference if mode == "reference" else run_pref_reference)(opts)
        out.write_text(json.dumps(result))
        return
    from trainer.parallel.topology import Topology

    topology = Topology.initialize(parallel_config(opts))
    run = {"convert": run_convert, "dpo": run_dpo}.get(mode, run_train)
    result = run(opts, topology)
    if topology.is_main:
        out.write_text(json.dumps(result))
    topology.destroy()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
