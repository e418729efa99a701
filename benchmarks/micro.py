"""Component timings behind docs/performance.md's choices, on CPU, in this process (2 threads).

    python benchmarks/micro.py [head] [adamw] [sdpa] [padding --assets DIR] [profile --assets DIR]

- head: forward + backward of the LM head's log-probs, full logits against the checkpointed chunks
  (``chunked_token_logps``) and the hand-written chunks (``fused_token_logps``) at chunk sizes 256, 512,
  1024; vocabularies 4,096 and 32,000 (hidden 256). The default ``logits_chunk_tokens`` comes from it.
- adamw: one torch AdamW step over the compare_trl model's parameter shapes (6.3M), per-parameter loop
  against ``foreach`` and ``fused``.
- sdpa: forward + backward of one causal attention call [1, 8, n, 32], the flash kernel against math.
- padding: the share of padding positions in first-fit rows of 512 over the SFT benchmark's batches
  (the records of ``compare_trl.py --out DIR``), the work one padding-free row saves.
- profile: where an SFT step's time goes. The model of compare_trl.py (random weights) trains on the SFT
  benchmark's first batches laid out as the deepspeed strategy lays them (one padding-free row, attention
  per segment, the fused head at the assistant tokens); torch.profiler splits forward + backward into matrix multiplications,
  attention and the rest (elementwise passes, copies, autograd), with the GEMMs' rate in the model against
  the same GEMM shapes timed alone and against the 1024² matmul probe. The optimizer step is not included.

Each cell is the median of ``--repeats`` after one warm-up, interleaved over 3 rounds, median of rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def rounds(cells: dict, repeats: int) -> dict:
    """{name: median over 3 interleaved rounds of timed(cell)}."""
    got: dict = {name: [] for name in cells}
    for _ in range(3):
        for name, fn in cells.items():
            got[name].append(timed(fn, repeats))
    return {name: round(statistics.median(v), 1) for name, v in got.items()}


def head() -> None:
    from trainer.losses import token_logps
    from trainer.losses.chunked import chunked_token_logps, fused_token_logps

    for vocab, tokens in ((4096, 1500), (4096, 3200), (32000, 2048), (32000, 4096)):
        gen = torch.Generator().manual_seed(0)
        hidden0 = torch.randn(1, tokens, 256, generator=gen)
        linear = torch.nn.Linear(256, vocab, bias=False)
        labels = torch.randint(0, vocab, (1, tokens), generator=gen)

        def run(logps_of):
            def fn():
                hidden = hidden0.clone().requires_grad_()
                linear.weight.grad = None
                logps_of(hidden).sum().backward()
            return fn

        cells = {"full": run(lambda h: token_logps(linear(h), labels))}
        for chunk in (256, 512, 1024):
            cells[f"checkpointed {chunk}"] = run(lambda h, c=chunk: chunked_token_logps(h, linear, labels, c))
            cells[f"fused {chunk}"] = run(lambda h, c=chunk: fused_token_logps(h, linear.weight, None, labels, c))
        print(json.dumps({"case": "head fwd+bwd ms", "vocab": vocab, "tokens": tokens,
                          **rounds(cells, 5 if vocab > 4096 else 9)}), flush=True)


def adamw() -> None:
    shapes = [(4096, 256)] + [(256, 256)] * 16 + [(1024, 256), (1024, 256), (256, 1024)] * 4 + [(256,)] * 9 \
        + [(4096, 256)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    cells = {}
    for name, kwargs in (("loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        cells[name] = torch.optim.AdamW(params, lr=1e-5, **kwargs).step
    print(json.dumps({"case": "AdamW step ms", "parameters": sum(p.numel() for p in params), **rounds(cells, 20)}))


def sdpa() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for n in (190, 400, 1000):
        q, k, v = (torch.randn(1, 8, n, 32, requires_grad=True) for _ in range(3))

        def run(backend):
            def fn():
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            return fn

        cells = {"flash": run(SDPBackend.FLASH_ATTENTION), "math": run(SDPBackend.MATH)}
        print(json.dumps({"case": "causal SDPA fwd+bwd ms", "n": n, **rounds(cells, 10)}), flush=True)


def padding(assets: Path) -> None:
    from trainer.data.chat import tokenize_chat
    from trainer.data.packing import pack
    from trainer.data.sampler import GlobalBatchPlan
    from trainer.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(assets / "model"))
    records = [json.loads(line) for line in (assets / "sft.jsonl").read_text().splitlines()]
    lengths = [len(tokenize_chat(tokenizer, r["messages"], 513)["input_ids"]) - 1 for r in records]
    plan = GlobalBatchPlan(len(records), 8, 8, 1, 0)  # compare_trl's batch 8, seed 0
    real = positions = 0
    for step in range(24):
        batch = [lengths[i] for i in plan.global_batch(step)]
        bins = pack(batch, 512)
        real += sum(batch)
        positions += len(bins) * max(sum(batch[i] for i in b) for b in bins)
    print(json.dumps({"case": "SFT benchmark batches, first-fit rows of 512", "steps": 24, "real_tokens": real,
                      "row_positions": positions, "padding_share": round(1 - real / positions, 3)}))


def profile(assets: Path, steps: int = 6) -> None:
    from collections import Counter

    from omegaconf import OmegaConf
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from compare_trl import MODEL, SEED, causal_context, matmul_probe
    from trainer.data.chat import tokenize_chat
    from trainer.data.sampler import GlobalBatchPlan
    from trainer.data.tokenizer import load_tokenizer
    from trainer.losses.chunked import fused_token_logps
    from trainer.models import build_model, segment_attention
    from trainer.parallel.deepspeed import _bypassed
    from trainer.stages.benchmark import flops_per_token, matmul_parameters

    tokenizer = load_tokenizer(str(assets / "model"))
    records = [json.loads(line) for line in (assets / "sft.jsonl").read_text().splitlines()]
    examples = [tokenize_chat(tokenizer, r["messages"], 513) for r in records]
    model = build_model(OmegaConf.create({"path": None, "arch": "llama", "config": MODEL,
                                          "attn_implementation": "sdpa"}), len(tokenizer), seed=SEED)
    segment_attention.register()
    head = model.get_output_embeddings()
    plan = GlobalBatchPlan(len(records), 8, 8, 1, SEED)  # compare_trl's batches
    rows = []
    for step in range(steps):
        batch = [examples[i] for i in plan.global_batch(step)]
        # inputs tokens[:-1], labels tokens[1:], scored where the label is an assistant token
        ids, labels, scored = (torch.cat([torch.tensor(x[key][a:b]) for x in batch])[None]
                               for key, a, b in (("input_ids", 0, -1), ("input_ids", 1, None), ("assistant_mask", 1, None)))
        positions = torch.cat([torch.arange(len(x["input_ids"]) - 1) for x in batch])[None]
        rows.append((ids, labels, scored.bool(), positions, segment_attention.packed_segments(positions),
                     [len(x["input_ids"]) - 1 for x in batch]))

    def step(row) -> None:  # as DeepSpeedStrategy.token_logps: the head after, at the scored positions
        ids, labels, scored, positions, segments, _ = row
        with _bypassed(head):
            hidden = model(input_ids=ids, position_ids=positions, segments=segments,
                           attention_mask=segment_attention.NO_MASK, use_cache=False).logits
        fused_token_logps(hidden[scored][None], head.weight, head.bias, labels[scored][None], 512).sum().backward()
        model.zero_grad(set_to_none=True)

    for row in rows:
        step(row)  # warm-up
    start = time.perf_counter()
    for row in rows:
        step(row)
    wall = time.perf_counter() - start
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for row in rows:
            step(row)
    gemm_ops = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::addmm_": (1, 2), "aten::bmm": (0, 1)}
    seconds, others, gemm_flop, shapes = Counter(), Counter(), 0.0, Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in gemm_ops:
            a, b = (event.input_shapes[i] for i in gemm_ops[event.key])
            batched = a[0] if len(a) == 3 else 1
            flop = 2 * batched * a[-2] * a[-1] * b[-1]
            gemm_flop += flop * event.count
            shapes[(tuple(a), tuple(b))] += event.count
            kind = "gemm"
        elif "scaled_dot_product" in event.key or "flash_attention" in event.key:
            kind = "attention"
        else:
            kind = "other"
            others[event.key] += event.self_cpu_time_total / 1e6
        seconds[kind] += event.self_cpu_time_total / 1e6
    alone = 0.0  # the same GEMMs timed alone, inputs hot in cache
    for (a, b), count in shapes.items():
        x, y = torch.randn(*a), torch.randn(*b)
        alone += timed(lambda: torch.matmul(x, y), 10) / 1e3 * count
    tokens = sum(sum(row[-1]) for row in rows)
    matmul = matmul_parameters(model)
    model_flop = flops_per_token(matmul, model.config, causal_context([[n] for row in rows for n in row[-1]])) * tokens
    attention_flop = model_flop - 6 * matmul * tokens  # the GEMMs also recompute the head's logits
    probe = matmul_probe()
    total = sum(seconds.values())
    print(json.dumps({"case": "SFT step forward + backward, one padding-free row", "steps": steps,
                      "tokens": tokens, "wall_ms_per_step": round(wall / steps * 1e3, 1),
                      "model_gflops": round(model_flop / wall / 1e9, 1), "probe_gflops": round(probe, 1),
                      "of_probe": round(model_flop / wall / 1e9 / probe, 3)}))
    for kind in ("gemm", "attention", "other"):
        print(json.dumps({"case": "profiled share", "part": kind, "ms_per_step": round(seconds[kind] / steps * 1e3, 1),
                          "share": round(seconds[kind] / total, 3)}))
    print(json.dumps({"case": "other, largest ops", **{k: round(v / steps * 1e3, 1) for k, v in others.most_common(8)}}))
    print(json.dumps({"case": "GEMMs", "in_model_gflops": round(gemm_flop / seconds["gemm"] / 1e9, 1),
                      "alone_gflops": round(gemm_flop / alone / 1e9, 1), "probe_gflops": round(probe, 1),
                      "attention_gflops": round(attention_flop / seconds["attention"] / 1e9, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["head", "adamw", "sdpa"],
                        choices=["head", "adamw", "sdpa", "padding", "profile"])
    parser.add_argument("--assets", type=Path, help="a compare_trl.py --out directory (padding, profile)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for part in args.parts:
        if part in ("padding", "profile"):
            if args.assets is None:
                parser.error(f"{part} needs --assets DIR (run benchmarks/compare_trl.py --out DIR first)")
            globals()[part](args.assets)
        else:
            globals()[part]()


if __name__ == "__main__":
    main()
