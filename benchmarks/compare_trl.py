"""stagecraft against TRL on CPU: SFT and DPO training throughput on the same model, tokenizer and data.

    python benchmarks/compare_trl.py --out DIR [--runs 2] [--steps 24] [--timed-from 4] [--trl-path /tmp/trlpkgs]
                                     [--only TEXT ...]

TRL is not a dependency of the package (`pip install -e .[bench]`, or for this script alone
`.venv/bin/pip install --no-deps --target /tmp/trlpkgs trl==1.16.0` and `--trl-path /tmp/trlpkgs`).

Built here, deterministically, nothing downloaded (:func:`build_assets`): a random Llama (hidden 256,
4 layers, 8 heads, SwiGLU 1024, vocabulary 4096, 6.29M parameters), the project's embedded BPE tokenizer
(byte fallback, its chat template) trained on the LongWriter-style corpus, and three data sets of
LongWriter-style English (trainer/curation/longwriter_data.py): 512 chat records (sft), 256 pairs of one
instruction and two answers (dpo), 256 multi-turn pairs whose prompt holds one or two earlier exchanges
(dpo_long_prompt), saved as an HF directory and JSONL files in DIR that both frameworks read.

Every run is a fresh process (fp32, 1 process, OMP_NUM_THREADS=2, batch 8, lr 1e-5), the modes
interleaved A B C ... A B C ... over --runs rounds so a slow spell of a shared machine hits all of them.
stagecraft runs through its CLI as a user types it; TRL through SFTTrainer / DPOTrainer with their
defaults except what the comparison needs equal (fp32, no gradient checkpointing, no saving).

Tokens are counted the same way for both (:func:`real_tokens`, :func:`record_tokens`): the non-pad
tokens of each sequence; for a preference pair the prompt once plus both responses. Step times are
each framework's own: TRL's from on_step_begin to on_step_end (a callback), stagecraft's from its
metrics.jsonl rate (its count over its step time, batch building included), the count recomputed for the
examples its sampler drew at that step. Throughput is tokens over time of steps timed-from..steps-1
(0-based), the median over rounds. Start-up is launch to the first step's start; peak RSS the child's
ru_maxrss (os.wait4). Model FLOP/s use stagecraft's own count (trainer/stages/benchmark.py) with a causal
context (:func:`causal_context`), as a fraction of a 1024x1024 fp32 matmul probe at 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 8, "max_position_embeddings": 1024, "tie_word_embeddings": False}
VOCAB, N_CHAT, N_PAIRS = 4096, 512, 256
# Data sets and their max_length (tokens of one sequence; a pair's prompt + one response). "dpo": one
# instruction and two long answers, the prompt a small share of the pair; "dpo_long_prompt": multi-turn
# pairs (one or two earlier exchanges, then the instruction), where the prompt is the larger part of
# each side, as in multi-turn preference data (Anthropic HH, HelpSteer2).
MAX_LENGTH = {"sft": 512, "dpo": 512, "dpo_long_prompt": 1024}
# LongWriter-style records of 100-200 asked words: 44-427 tokens through the embedded tokenizer.
LONGWRITER = {"p_chinese": 0.0, "min_required": 100, "max_required": 200, "sigma": 0.2}
BATCH, LR, THREADS, SEED = 8, 1e-5, 2, 0
TRL_VERSION = "1.16.0"

# name: (framework, algorithm, data set, options: TRL config fields or stagecraft overrides)
MODES = {
    "trl sft (padding)": ("trl", "sft", "sft", {}),
    # TRL refuses max_length with padding_free and no packing; no record is longer than MAX_LENGTH anyway.
    "trl sft padding_free": ("trl", "sft", "sft", {"padding_free": True, "max_length": None}),
    "stagecraft sft": ("stagecraft", "sft", "sft", []),
    "stagecraft sft packing=false": ("stagecraft", "sft", "sft", ["stage.packing=false"]),
    "trl dpo precompute_ref": ("trl", "dpo", "dpo", {"precompute_ref_log_probs": True}),
    "stagecraft dpo": ("stagecraft", "dpo", "dpo", []),
    "stagecraft dpo packing=false prefix_sharing=false": (
        "stagecraft", "dpo", "dpo", ["stage.packing=false", "stage.prefix_sharing=false"]),
    "trl dpo precompute_ref, long prompts": ("trl", "dpo", "dpo_long_prompt", {"precompute_ref_log_probs": True}),
    "stagecraft dpo, long prompts": ("stagecraft", "dpo", "dpo_long_prompt", []),
    "stagecraft dpo packing=false prefix_sharing=false, long prompts": (
        "stagecraft", "dpo", "dpo_long_prompt", ["stage.packing=false", "stage.prefix_sharing=false"]),
}
DATA = sorted({m[2] for m in MODES.values()})


# ---- the shared model, tokenizer and data ------------------------------------------------------------
def build_assets(out: Path) -> dict:
    """Write DIR/model (config, weights, tokenizer) and DIR/<data set>.jsonl for each of DATA; return
    their sizes (a pair's tokens count its prompt once; prompt_share is the prompts' part of them)."""
    sys.path.insert(0, str(ROOT))
    from omegaconf import OmegaConf

    from trainer.curation.longwriter_data import generate
    from trainer.data.synthetic import write_jsonl
    from trainer.data.tokenizer import build_embedded_tokenizer
    from trainer.models import build_model, count_parameters

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_embedded_tokenizer(VOCAB, out / "cache" / "tokenizers", corpus="longwriter")
    model = build_model(OmegaConf.create({"path": None, "arch": "llama", "config": MODEL,
                                          "attn_implementation": "sdpa"}), len(tokenizer), seed=SEED)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # TRL would align them, with a warning
        setattr(model.config, key, getattr(tokenizer, key))
        setattr(model.generation_config, key, getattr(tokenizer, key))
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    chat, _ = generate(N_CHAT, SEED, **LONGWRITER)
    # A pair: one record's instruction and response (chosen) and the next record's response (rejected).
    other, _ = generate(2 * N_PAIRS, SEED + 1, **LONGWRITER)
    pairs = [{"prompt": a["messages"][:1], "chosen": a["messages"][1:], "rejected": b["messages"][1:]}
             for a, b in zip(other[::2], other[1::2])]
    long_prompt = _long_prompt_pairs(tokenizer, generate(4 * N_PAIRS, SEED + 2, **LONGWRITER)[0])
    write_jsonl(out / "sft.jsonl", chat)
    write_jsonl(out / "dpo.jsonl", pairs)
    write_jsonl(out / "dpo_long_prompt.jsonl", long_prompt)
    lengths = [record_tokens(tokenizer, r) for r in chat]
    sizes = {"vocab": len(tokenizer), "parameters": count_parameters(model), "chat_records": len(chat),
             "chat_tokens": [min(lengths), max(lengths)]}
    for name, data in (("", pairs), ("long_prompt_", long_prompt)):
        layouts = [token_layout(tokenizer, r) for r in data]
        sizes.update({f"{name}pairs": len(data), f"{name}pair_tokens": [min(map(sum, layouts)), max(map(sum, layouts))],
                      f"{name}prompt_share": sum(x[0] for x in layouts) / sum(map(sum, layouts))})
    return sizes


def _long_prompt_pairs(tokenizer, records: list[dict]) -> list[dict]:
    """Multi-turn pairs from four records each: two earlier exchanges, then the third record's
    instruction with its response (chosen) against the fourth's (rejected). An earlier exchange is
    dropped, oldest first, while a side would exceed MAX_LENGTH["dpo_long_prompt"]."""
    pairs = []
    for a, b, final, other in zip(*(records[i::4] for i in range(4))):
        history = a["messages"] + b["messages"]
        while True:
            pair = {"prompt": history + final["messages"][:1], "chosen": final["messages"][1:],
                    "rejected": other["messages"][1:]}
            prompt, chosen, rejected = token_layout(tokenizer, pair)
            if prompt + max(chosen, rejected) <= MAX_LENGTH["dpo_long_prompt"] or not history:
                break
            history = history[2:]
        pairs.append(pair)
    return pairs


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                         add_generation_prompt=add_generation_prompt)["input_ids"]


def token_layout(tokenizer, record: dict) -> list[int]:
    """A chat record's [sequence length]; a pair's [prompt (with the assistant header), chosen response,
    rejected response], each response the tokens its side adds after the prompt."""
    if "messages" in record:
        return [len(_ids(tokenizer, record["messages"]))]
    prompt = len(_ids(tokenizer, record["prompt"], add_generation_prompt=True))
    return [prompt, *(len(_ids(tokenizer, record["prompt"] + record[k])) - prompt for k in ("chosen", "rejected"))]


def record_tokens(tokenizer, record: dict) -> int:
    """A record's real tokens as :func:`real_tokens` counts them in a batch: a pair's prompt once."""
    return sum(token_layout(tokenizer, record))


def real_tokens(batch: dict) -> int:
    """Non-pad tokens of one TRL training batch, a pair's prompt counted once.

    SFT padded: the attention mask's ones. SFT padding-free: one row with no padding (no attention
    mask). DPO: rows [chosen_0..chosen_{B-1}, rejected_0..] share each pair's prompt, so the chosen
    rows count whole and the rejected rows only their completion tokens.
    """
    if "completion_mask" in batch:
        half = batch["input_ids"].shape[0] // 2
        return int(batch["attention_mask"][:half].sum() + batch["completion_mask"][half:].sum())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


def causal_context(lengths: list[list[int]]) -> float:
    """The mean number of keys a token attends under a causal mask, token-weighted.

    Each entry is [L] for a sequence, or [p, c, r] for a pair (prompt once, both responses after it).
    Token i of a sequence attends i keys, so a sequence contributes L(L+1)/2 and a response after a
    prompt of p tokens c·p + c(c+1)/2. This replaces the full length T in ``6N + 12·layers·d·T``.
    """
    def keys(n: int, before: int = 0) -> int:
        return n * before + n * (n + 1) // 2

    total = sum(keys(x[0]) + sum(keys(n, x[0]) for n in x[1:]) for x in lengths)
    return total / sum(sum(x) for x in lengths)


# ---- the TRL child ---------------------------------------------------------------------------------
def trl_child(mode: str, out: Path, run_dir: Path, steps: int) -> None:
    """One TRL run in this process; writes run_dir/result.json."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    _, algo, data_set, options = MODES[mode]
    record: dict = {"steps": [], "precompute_s": None}

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            record.setdefault("first_step_wall", time.time())
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record["steps"][-1]["seconds"] = time.perf_counter() - self.t0

    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32, attn_implementation="sdpa")
    data = load_dataset("json", data_files=str(out / f"{data_set}.jsonl"), split="train")
    common = dict(output_dir=str(run_dir), max_steps=steps, per_device_train_batch_size=BATCH,
                  gradient_accumulation_steps=1, learning_rate=LR, bf16=False, fp16=False, use_cpu=True,
                  gradient_checkpointing=False, seed=SEED, logging_steps=1, save_strategy="no", report_to="none",
                  disable_tqdm=True, **{"max_length": MAX_LENGTH[data_set], **options})
    if algo == "sft":
        trainer = SFTTrainer(model, args=SFTConfig(**common), train_dataset=data, processing_class=tokenizer)
    else:
        precompute = DPOTrainer._precompute_ref_logps  # runs inside __init__: time it there

        def timed(self, *args, **kwargs):
            t0 = time.perf_counter()
            result = precompute(self, *args, **kwargs)
            record["precompute_s"] = time.perf_counter() - t0
            return result

        DPOTrainer._precompute_ref_logps = timed
        trainer = DPOTrainer(model, args=DPOConfig(**common), train_dataset=data, processing_class=tokenizer)
    trainer.add_callback(StepClock())
    step = trainer.training_step

    def counted(*args, **kwargs):  # gradient_accumulation_steps=1: one call per optimizer step
        inputs = kwargs["inputs"] if "inputs" in kwargs else args[1]
        record["steps"].append({"tokens": real_tokens(inputs)})
        return step(*args, **kwargs)

    trainer.training_step = counted
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for s, loss in zip(record["steps"], losses):
        s["loss"] = loss
    (run_dir / "result.json").write_text(json.dumps(record))


# ---- running one mode ------------------------------------------------------------------------------
def launch(cmd: list[str], env: dict, log: Path, watch: Path | None = None) -> dict:
    """Run ``cmd`` to completion; its exit code, wall time, peak RSS and, when ``watch`` is given, the
    wall-clock time the first training record appeared in that metrics file (a 20 ms poll)."""
    started = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    first_record = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if first_record is None and watch is not None and watch.is_file() and '"loss"' in watch.read_text():
            first_record = time.time()
        if pid:
            break
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); its output: {log}\n"
                           + log.read_text()[-3000:])
    return {"started": started, "wall_s": time.time() - started, "peak_rss_mib": usage.ru_maxrss / 1024,
            "first_record": first_record}


def child_env(run_dir: Path, extra_path: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1",
           # Fresh caches per run: TRL's precomputed reference log-probs and stagecraft's tokenised data
           # and reference table would otherwise be reused by a later round, skipping work.
           "HF_DATASETS_CACHE": str(run_dir / "hf_datasets"), "STAGECRAFT_CACHE": str(run_dir / "cache")}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    return env


def run_trl(mode: str, out: Path, run_dir: Path, steps: int, trl_path: str | None) -> dict:
    cmd = [sys.executable, __file__, "--out", str(out), "--trl-child", mode, str(run_dir), "--steps", str(steps)]
    proc = launch(cmd, child_env(run_dir, trl_path), run_dir / "output.log")
    result = json.loads((run_dir / "result.json").read_text())
    return {**proc, "steps": result["steps"], "precompute_s": result["precompute_s"],
            "startup_s": result["first_step_wall"] - proc["started"]}


class StagecraftCounts:
    """Per-example counts for reading a stagecraft run's metrics.jsonl: the harness's token count
    (:func:`record_tokens`), stagecraft's own (which converts its rate back to a step time: SFT input
    tokens, one fewer than the sequence; DPO response tokens) and its SFT target tokens (a check that the
    examples drawn here are the run's), and the order its sampler draws them in."""

    def __init__(self, out: Path, data_set: str, steps: int) -> None:
        sys.path.insert(0, str(ROOT))
        from trainer.data.chat import tokenize_chat
        from trainer.data.preference import tokenize_pair
        from trainer.data.sampler import GlobalBatchPlan
        from trainer.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(str(out / "model"))
        records = [json.loads(line) for line in (out / f"{data_set}.jsonl").read_text().splitlines()]
        self.harness = [record_tokens(tokenizer, r) for r in records]
        max_length = MAX_LENGTH[data_set]
        if data_set == "sft":
            examples = [tokenize_chat(tokenizer, r["messages"], max_length + 1) for r in records]
            self.own = [len(e["input_ids"]) - 1 for e in examples]
            self.targets = [sum(e["assistant_mask"][1:]) for e in examples]
        else:
            pairs = [tokenize_pair(tokenizer, r, max_length + 1) for r in records]
            self.own = [sum(sum(p[k]["assistant_mask"][1:]) for k in ("chosen", "rejected")) for p in pairs]
            self.targets = None
        plan = GlobalBatchPlan(len(records), BATCH, BATCH, 1, SEED)
        self.batches = [plan.global_batch(s) for s in range(steps)]

    def steps(self, metrics: list[dict]) -> list[dict]:
        rows = []
        for m, ids in zip(metrics, self.batches):
            rate = next(v for k, v in m.items() if k.endswith("_per_s"))
            if self.targets is not None and m["target_tokens"] != sum(self.targets[i] for i in ids):
                raise RuntimeError(f"step {m['step']}: stagecraft trained {m['target_tokens']} target tokens, the "
                                   "harness's copy of its batch plan has a different count: the accounting is off")
            rows.append({"tokens": sum(self.harness[i] for i in ids), "loss": m["loss"],
                         "seconds": sum(self.own[i] for i in ids) / rate})
        return rows


def run_stagecraft(mode: str, out: Path, run_dir: Path, steps: int, counts: StagecraftCounts) -> dict:
    _, algo, data_set, overrides = MODES[mode]
    cmd = [str(Path(sys.executable).with_name("stagecraft")), f"run.dir={run_dir / 'run'}", f"run.seed={SEED}",
           "model=hf", f"model.path={out / 'model'}", "data=jsonl", f"data.train=[{out / f'{data_set}.jsonl'}]",
           f"data.max_length={MAX_LENGTH[data_set]}", f"stage.max_steps={steps}", f"stage.global_batch_size={BATCH}",
           f"stage.micro_batch_size={BATCH}", f"stage.optim.lr={LR}", "parallel.device=cpu",
           "logging.progress=false", "logging.wandb_mode=disabled", "checkpoint.export_hf=false", *overrides]
    if algo == "dpo":
        cmd.insert(1, "stage=dpo")
    stage_dir = run_dir / "run" / "stages" / algo
    proc = launch(cmd, child_env(run_dir), run_dir / "output.log", watch=stage_dir / "metrics.jsonl")
    metrics = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    rows = counts.steps([m for m in metrics if "loss" in m])
    return {**proc, "steps": rows, "precompute_s": _reference_seconds(run_dir / "run" / "cli.log"),
            "startup_s": proc["first_record"] - rows[0]["seconds"] - proc["started"]}


def _reference_seconds(cli_log: Path) -> float | None:
    """stagecraft's reference pass: from the log line before "reference log-probs for train cached" to it."""
    stamps = [(datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f"), line) for line in
              cli_log.read_text().splitlines() if line.startswith("[20")]
    for (before, _), (at, line) in zip(stamps, stamps[1:]):
        if "reference log-probs for train cached" in line:
            return (at - before).total_seconds()
    return None


# ---- probe, summary, report --------------------------------------------------------------------------
def matmul_probe() -> float:
    """GFLOP/s of a 1024x1024 fp32 matmul in this process (best of 5 repeats of 20)."""
    import torch

    torch.set_num_threads(THREADS)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 ** 3 * 20 / best / 1e9


def probe_in_child(run_dir: Path) -> float:
    run_dir.mkdir(parents=True, exist_ok=True)
    launch([sys.executable, __file__, "--out", str(run_dir), "--probe-child", str(run_dir / "probe.json")],
           child_env(run_dir), run_dir / "output.log")
    return json.loads((run_dir / "probe.json").read_text())["gflops"]


def flop_per_token(out: Path) -> dict[str, float]:
    """Model training FLOP per counted token, per data set: ``6 N + 12 · layers · d_attn · c̄`` with N
    the matmul parameters (the LM head included, the input embedding lookup not), the factor 6 = forward
    2 + backward 4 FLOP per parameter and token, the attention term the QK^T and AV matmuls (2 · 2 · d
    FLOP per attended key and token, times 3 for the backward) over c̄ = the data's mean causal context
    (:func:`causal_context`). The reference forward of DPO (precomputed by both) is not counted."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from trainer.stages.benchmark import flops_per_token, matmul_parameters

    config = AutoConfig.from_pretrained(out / "model")
    with torch.device("meta"):
        n = matmul_parameters(AutoModelForCausalLM.from_config(config))
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    flop = {"matmul_parameters": n}
    for data_set in DATA:
        layouts = [token_layout(tokenizer, json.loads(line))
                   for line in (out / f"{data_set}.jsonl").read_text().splitlines()]
        flop[data_set] = flops_per_token(n, config, causal_context(layouts))
    return flop


def summarise(runs: list[dict], timed_from: int, probe: float, flop: dict) -> dict:
    modes = {}
    for mode, (framework, algo, data_set, _) in MODES.items():
        mine = [r for r in runs if r["mode"] == mode]
        if not mine:  # left out by --only
            continue
        rates, step_s = [], []
        for r in mine:
            timed = r["steps"][timed_from:]
            rates.append(sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed))
            step_s.append(statistics.mean(s["seconds"] for s in timed))
        tps = statistics.median(rates)
        modes[mode] = {"framework": framework, "algorithm": algo, "data": data_set, "tokens_per_s": tps, "rounds": rates,
                       "step_s": statistics.median(step_s),
                       "startup_s": statistics.median(r["startup_s"] for r in mine),
                       "precompute_s": (statistics.median(r["precompute_s"] for r in mine)
                                        if all(r["precompute_s"] is not None for r in mine) else None),
                       "peak_rss_mib": max(r["peak_rss_mib"] for r in mine),
                       "first_loss": mine[0]["steps"][0].get("loss"),
                       "model_gflops": tps * flop[data_set] / 1e9, "of_probe": tps * flop[data_set] / 1e9 / probe}
    for m in modes.values():
        trl = [o["tokens_per_s"] for o in modes.values() if o["framework"] == "trl" and o["data"] == m["data"]]
        m["vs_trl_best"] = m["tokens_per_s"] / max(trl) if trl else None
    return modes


def report(results: dict) -> str:
    a, env = results["assets"], results["environment"]
    flop = results["flop_per_token"]
    lines = [f"# stagecraft vs TRL {env['trl']} on CPU", "",
             f"Llama {a['parameters'] / 1e6:.2f}M parameters (hidden 256, 4 layers, 8 heads, SwiGLU 1024, vocab "
             f"{a['vocab']}), fp32, 1 process, {THREADS} threads, batch {BATCH}. Data: sft = {a['chat_records']} chat "
             f"records ({a['chat_tokens'][0]}-{a['chat_tokens'][1]} tokens); dpo = {a['pairs']} pairs "
             f"({a['pair_tokens'][0]}-{a['pair_tokens'][1]} tokens, prompt once; prompts {a['prompt_share']:.0%} of "
             f"the tokens); dpo_long_prompt = {a['long_prompt_pairs']} multi-turn pairs "
             f"({a['long_prompt_pair_tokens'][0]}-{a['long_prompt_pair_tokens'][1]} tokens; prompts "
             f"{a['long_prompt_prompt_share']:.0%}). Steps {results['timed_from']}..{results['steps'] - 1} timed, "
             f"median of {results['runs']} interleaved rounds. torch {env['torch']}, transformers "
             f"{env['transformers']}.", "",
             f"Matmul probe (1024² fp32, {THREADS} threads): {results['probe_gflops'][0]:.1f} GFLOP/s before, "
             f"{results['probe_gflops'][1]:.1f} after (their mean is the denominator). Model FLOP per token: "
             + ", ".join(f"{d} {flop[d]:.3g}" for d in DATA)
             + f" (6N + causal attention; N = {flop['matmul_parameters']:,} matmul parameters).", "",
             "| mode | data | tokens/s | vs TRL best | step s | start-up s | ref precompute s | peak RSS MiB | "
             "model GFLOP/s | of probe | loss step 1 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in results["modes"].items():
        pre = "-" if m["precompute_s"] is None else f"{m['precompute_s']:.1f}"
        loss = "-" if m["first_loss"] is None else f"{m['first_loss']:.4f}"
        ratio = "-" if m["vs_trl_best"] is None else f"{m['vs_trl_best']:.2f}x"
        lines.append(f"| {name} | {m['data']} | {m['tokens_per_s']:,.0f} | {ratio} | {m['step_s']:.2f} | "
                     f"{m['startup_s']:.1f} | {pre} | {m['peak_rss_mib']:,.0f} | {m['model_gflops']:.1f} | "
                     f"{m['of_probe']:.0%} | {loss} |")
    lines += ["", "Tokens: non-pad tokens of each sequence, a pair's prompt once. TRL SFT's loss is on every "
              "token (its default for chat data), stagecraft's on assistant tokens; the start-up of DPO includes "
              "the reference pass (also shown alone)."]
    return "\n".join(lines) + "\n"


def trl_version(trl_path: str | None) -> str:
    proc = subprocess.run([sys.executable, "-c", "import trl; print(trl.__version__)"], capture_output=True,
                          text=True, env=child_env(Path("/nonexistent"), trl_path))
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["?"])[-1]
        sys.exit(f"TRL cannot be imported ({why}). Install it for this benchmark only:\n"
                 f"  {sys.executable} -m pip install --no-deps --target /tmp/trlpkgs trl=={TRL_VERSION}\n"
                 "and pass --trl-path /tmp/trlpkgs (or `pip install -e .[bench]` into this environment).")
    return proc.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--timed-from", type=int, default=4, help="first timed step, 0-based")
    parser.add_argument("--trl-path", default=None, help="a --target directory holding trl (PYTHONPATH of TRL runs)")
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                        help="run only the modes whose name contains one of these (e.g. 'long prompts')")
    parser.add_argument("--trl-child", nargs=2, metavar=("MODE", "RUN_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_child:
        args.probe_child.write_text(json.dumps({"gflops": matmul_probe()}))
        return
    if args.trl_child:
        trl_child(args.trl_child[0], args.out, Path(args.trl_child[1]), args.steps)
        return
    if not 0 <= args.timed_from < args.steps:
        parser.error("--timed-from must be in [0, --steps)")
    out = args.out.resolve()
    version = trl_version(args.trl_path)
    import torch
    import transformers

    assets = build_assets(out)
    print(f"assets: {assets}", file=sys.stderr)
    modes = [m for m in MODES if args.only is None or any(o in m for o in args.only)]
    counts = {d: StagecraftCounts(out, d, args.steps) for d in {MODES[m][2] for m in modes}}
    probes = [probe_in_child(out / "runs" / "probe-before")]
    runs = []
    for r in range(args.runs):
        for i, mode in enumerate(modes):
            framework, _, data_set, _ = MODES[mode]
            run_dir = out / "runs" / f"r{r}-m{i}"
            run_dir.mkdir(parents=True, exist_ok=True)
            result = (run_trl(mode, out, run_dir, args.steps, args.trl_path) if framework == "trl"
                      else run_stagecraft(mode, out, run_dir, args.steps, counts[data_set]))
            runs.append({"mode": mode, "round": r, **result})
            print(f"round {r} {mode}: {result['wall_s']:.0f} s wall", file=sys.stderr, flush=True)
    probes.append(probe_in_child(out / "runs" / "probe-after"))
    flop = flop_per_token(out)
    results = {"assets": assets, "runs": args.runs, "steps": args.steps, "timed_from": args.timed_from,
               "environment": {"trl": version, "torch": torch.__version__, "transformers": transformers.__version__,
                               "threads": THREADS},
               "probe_gflops": probes, "flop_per_token": flop,
               "modes": summarise(runs, args.timed_from, statistics.mean(probes), flop), "raw": runs}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
