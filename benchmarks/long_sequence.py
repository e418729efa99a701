"""Peak memory of one SFT step on one long sequence: chunked LM head against full-vocabulary logits.

    python benchmarks/long_sequence.py [--lengths 1024 2048 4096 8192] [--out long_sequence.json]

A Llama built from config (vocabulary 32,000, hidden 256, 4 layers, SwiGLU 1024, 8 heads, fp32) takes two
optimizer steps through the deepspeed strategy (ZeRO-0, 1 process) on one sequence of N random tokens,
loss on every token: once with ``parallel.logits_chunk_tokens=0`` (full logits) and once with the
default chunking. Each measurement runs in a fresh process, so one peak cannot hide another; peak RSS
is the process's ``ru_maxrss``, and the time is the second step's (the first pays one-time allocations).
Prints a markdown table.
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
    seconds = []
    for _ in range(2):  # the first step also pays one-time allocations; the second is timed
        started = time.perf_counter()
        info = strategy.train_step([batch], lambda logps, b: -(logps * b["loss_mask"]).sum() / b["loss_mask"].sum())
        seconds.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens": length, "chunk": chunk, "peak_rss_mib": round(peak), "before_step_mib": round(before),
            "step_s": round(seconds[-1], 2), "loss": float(info["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--chunk", type=int, default=None, help="chunked run's logits_chunk_tokens (default: the schema's)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", type=int, nargs=2, metavar=("LENGTH", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    from trainer.config.schema import ParallelConfig

    chunk = args.chunk if args.chunk is not None else ParallelConfig().logits_chunk_tokens
    rows = []
    for length in args.lengths:
        for c in (0, chunk):
            proc = subprocess.run([sys.executable, __file__, "--one", str(length), str(c)], cwd=ROOT,
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    print("| tokens | full logits: peak RSS MiB | step s | chunked (%d): peak RSS MiB | step s | saved |" % chunk)
    print("|---|---|---|---|---|---|")
    for full, chunked in zip(rows[::2], rows[1::2]):
        print(f"| {full['tokens']:,} | {full['peak_rss_mib']:,} | {full['step_s']} | {chunked['peak_rss_mib']:,} | "
              f"{chunked['step_s']} | {1 - chunked['peak_rss_mib'] / full['peak_rss_mib']:.0%} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
