"""Peak RSS of loading a chat dataset at 1x and 10x the records: tokenised into the shared cache
(trainer/data/cache.py, the stages' path) against the in-memory list of examples.

    python benchmarks/data_memory.py [--records 20000] [--scales 1 10]

Each cell is a fresh process (peak RSS is per process: `ru_maxrss`), run twice on the cache path: the
first builds the cache (rank 0's work), the second maps it (every other rank, every later run). After
loading, every example is read once, as an epoch would, so a lazy dataset pays for its reads too.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(data: str, cache: str, mode: str) -> None:
    sys.path.insert(0, str(ROOT))
    from omegaconf import OmegaConf

    from trainer.data.tokenizer import build_embedded_tokenizer
    from trainer.stages import common

    class Solo:
        is_main, world_size = True, 1

        def barrier(self):
            pass

    tokenizer = build_embedded_tokenizer(400, Path(cache) / "tokenizers")
    data_cfg = OmegaConf.create({"on_bad_record": "error", "max_length": 128, "truncation": "right",
                                 "cache_dir": cache})
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    examples, stats = common.tokenized_chat_dataset([Path(data)], tokenizer, data_cfg,
                                                    Solo() if mode == "cache" else None)
    tokens = sum(len(examples[i]["input_ids"]) for i in range(len(examples)))
    print(json.dumps({"examples": len(examples), "tokens": tokens, "cache": stats.get("cache", "-"),
                      "seconds": round(time.perf_counter() - start, 1),
                      "rss_before_mib": base // 1024,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--child", nargs=3)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    sys.path.insert(0, str(ROOT))
    from trainer.data.synthetic import generate_chat_records, write_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        print("| records | path | examples | tokens | load + one read of each s | RSS after imports MiB | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|")
        for scale in args.scales:
            data = Path(tmp) / f"data-{scale}x.jsonl"
            write_jsonl(data, generate_chat_records(args.records * scale, scale, ["reverse", "sort", "count", "copy"]))
            for mode in ("list", "cache", "cache"):
                out = subprocess.run([sys.executable, __file__, "--child", str(data), str(cache), mode],
                                     check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                r = json.loads(out)
                label = "in-memory list" if mode == "list" else f"cache ({r['cache']})"
                print(f"| {args.records * scale:,} | {label} | {r['examples']:,} | {r['tokens']:,} | {r['seconds']} "
                      f"| {r['rss_before_mib']:,} | {r['peak_rss_mib']:,} |", flush=True)


if __name__ == "__main__":
    main()
