"""Peak memory of one SFT step on one long sequence: chunked LM head against full-vocabulary logits,
and against TRL's SFTTrainer on the same model and tokens.

    python benchmarks/long_sequence.py [--lengths 1024 2048 4096 8192] [--out long_sequence.json]
                                       [--trl-path /tmp/trlpkgs | --no-trl]

A Llama built from config (vocabulary 32,000, hidden 256, 4 layers, SwiGLU 1024, 8 heads, fp32) takes two
optimizer steps through the deepspeed strategy (ZeRO-0, 1 process) on one sequence of N random tokens,
loss on every token: once with ``parallel.logits_chunk_tokens=0`` (full logits) and once with the
default chunking. TRL (a benchmark-only extra, see benchmarks/compare_trl.py) trains the same model
(same seed) on the same tokens, given pre-tokenised, with its defaults otherwise (fp32, AdamW, loss on
every token, no gradient checkpointing). Each measurement runs in a fresh process (2 threads), so one
peak cannot hide another; peak RSS is the process's ``ru_maxrss`` — imports, model, optimizer state and
the step's activations, as a user's process holds them — and the time is the second step's (the first
pays one-time allocations). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 8, "max_position_embeddings": 8192, "tie_word_embeddings": False}
VOCAB = 32000


def one(length: int, chunk: int) -> dict:
    """One step in this process; returns its peak RSS and timings."""
    import torch
    from omegaconf import OmegaConf

    from trainer.config.schema import OptimConfig, ParallelConfig
    from trainer.models import build_model
    from trainer.parallel.deepspeed import DeepSpeedStrategy
    from trainer.parallel.topology import Topology

    parallel = OmegaConf.structured(ParallelConfig(device="cpu", backend="gloo", logits_chunk_tokens=chunk))
    topology = Topology.initialize(parallel)
    model = build_model(OmegaConf.create({"path": None, "arch": "llama", "config": MODEL,
                                          "attn_implementation": "sdpa"}), VOCAB, seed=0)
    strategy = DeepSpeedStrategy(parallel, topology)
    strategy.setup(model, OmegaConf.structured(OptimConfig()), micro_batch_size=1, grad_accum=1, total_steps=10)
    ids = torch.randint(0, VOCAB, (1, length + 1), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "attention_mask": torch.ones(1, length, dtype=torch.long),
             "loss_mask": torch.ones(1, length)}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds, losses = [], []
    for _ in range(2):  # the first step also pays one-time allocations; the second is timed
        started = time.perf_counter()
        info = strategy.train_step([batch], lambda logps, b: -(logps * b["loss_mask"]).sum() / b["loss_mask"].sum())
        seconds.append(time.perf_counter() - started)
        losses.append(float(info["loss"]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens": length, "chunk": chunk, "peak_rss_mib": round(peak), "before_step_mib": round(before),
            "step_s": round(seconds[-1], 2), "loss_step_1": losses[0]}


def trl_one(length: int) -> dict:
    """Two SFTTrainer steps on the same model and tokens in this process."""
    import tempfile

    import torch
    from datasets import Dataset
    from omegaconf import OmegaConf
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from trainer.data.tokenizer import build_embedded_tokenizer
    from trainer.models import build_model

    model = build_model(OmegaConf.create({"path": None, "arch": "llama", "config": MODEL,
                                          "attn_implementation": "sdpa"}), VOCAB, seed=0)
    work = Path(tempfile.mkdtemp(prefix="long_sequence_trl_"))
    tokenizer = build_embedded_tokenizer(512, work / "tokenizers")  # pads only; the ids below are given
    ids = torch.randint(0, VOCAB, (1, length + 1), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": [ids[0].tolist()]})  # N + 1 tokens: N predicted, as above
    record: dict = {"seconds": []}

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            record["before_step_mib"] = record.get("before_step_mib",
                                                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record["seconds"].append(time.perf_counter() - self.t0)

    config = SFTConfig(output_dir=str(work / "run"), max_steps=2, per_device_train_batch_size=1,
                       max_length=length + 1, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
                       logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
    trainer = SFTTrainer(model, args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[StepClock()])
    trainer.train()
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens": length, "chunk": "trl", "peak_rss_mib": round(peak),
            "before_step_mib": round(record["before_step_mib"]), "step_s": round(record["seconds"][-1], 2),
            "loss_step_1": float(loss)}


def _child(args: list[str], trl_path: str | None = None) -> dict:
    """One cell in a fresh process, with compare_trl's child environment (threads, offline, fresh caches)."""
    import tempfile

    from compare_trl import child_env  # this script's directory is sys.path[0]

    env = child_env(Path(tempfile.mkdtemp(prefix="long_sequence_")), trl_path)
    proc = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--chunk", type=int, default=None, help="chunked run's logits_chunk_tokens (default: the schema's)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--trl-path", default=None, help="a --target directory holding trl (PYTHONPATH of TRL runs)")
    parser.add_argument("--no-trl", action="store_true", help="stagecraft's two columns only")
    parser.add_argument("--one", type=int, nargs=2, metavar=("LENGTH", "CHUNK"), help=argparse.SUPPRESS)
    parser.add_argument("--trl-one", type=int, metavar="LENGTH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    if args.trl_one:
        print(json.dumps(trl_one(args.trl_one)))
        return
    from trainer.config.schema import ParallelConfig

    chunk = args.chunk if args.chunk is not None else ParallelConfig().logits_chunk_tokens
    rows = []
    for length in args.lengths:
        cells = [["--one", str(length), str(c)] for c in (0, chunk)]
        if not args.no_trl:
            cells.append(["--trl-one", str(length)])
        for cell in cells:
            rows.append(_child(cell, args.trl_path))
            print(rows[-1], file=sys.stderr)
    per_length = len(rows) // len(args.lengths)
    head = f"| tokens | full logits: peak RSS MiB | step s | chunked ({chunk}): peak RSS MiB | step s | saved |"
    print(head + (" TRL: peak RSS MiB | step s | chunked / TRL |" if per_length == 3 else ""))
    print("|---|---|---|---|---|---|" + ("---|---|---|" if per_length == 3 else ""))
    for i in range(0, len(rows), per_length):
        full, chunked, *trl = rows[i:i + per_length]
        line = (f"| {full['tokens']:,} | {full['peak_rss_mib']:,} | {full['step_s']} | {chunked['peak_rss_mib']:,} | "
                f"{chunked['step_s']} | {1 - chunked['peak_rss_mib'] / full['peak_rss_mib']:.0%} |")
        if trl:
            line += f" {trl[0]['peak_rss_mib']:,} | {trl[0]['step_s']} | {chunked['peak_rss_mib'] / trl[0]['peak_rss_mib']:.0%} |"
        print(line)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
