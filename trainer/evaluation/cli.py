"""``stagecraft eval HF_DIR [--tasks T1,T2 ...] [--include-path DIR] [--limit N] [--length-following F.jsonl]``.

Evaluates an HF export offline: lm-evaluation-harness tasks through its HF backend (local task YAMLs
with local data, and the project's own ``stagecraft_synthetic_mc``), and/or the built-in
LongWriter-style length-following score (docs/evaluation.md). Results are printed and written as
JSON (``--out``; by default beside the model directory: ``<stage>/eval/`` for a stage's export,
``HF_DIR-eval/`` otherwise). Exit codes are the run's
(trainer/runtime/errors.py): 0 done, 2 bad input (an unknown task, a missing file, lm-eval not
installed), with ``stagecraft eval: error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from trainer.runtime.errors import BadInput, report_failure


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagecraft eval", description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("hf_dir", help="a Hugging Face model directory, e.g. <run.dir>/stages/<stage>/hf")
    parser.add_argument("--tasks", nargs="+", default=[], metavar="TASK",
                        help="lm-eval task names (space- or comma-separated), e.g. stagecraft_synthetic_mc")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="a directory of task YAMLs (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="at most N documents per task")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="render each prompt with the tokenizer's chat template (for chat-tuned stages)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--length-following", metavar="FILE.jsonl", default=None,
                        help="prompts with required lengths; reports LongWriter's mean S_l")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="generation budget for --length-following")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="directory for lm_eval.json / length_following.json (default: <stage>/eval, or HF_DIR-eval)")
    return parser


def _task_names(values: list[str]) -> list[str]:
    return [t for v in values for t in v.split(",") if t]


def _print_lm_eval(report: dict) -> None:
    for task, metrics in report["results"].items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len")
        n = report["n-samples"].get(task, {}).get("effective")
        print(f"{task}: {shown}" + (f" ({n} documents)" if n is not None else ""))
    print(f"lm-eval results: {report['path']}")


def run(args: argparse.Namespace) -> None:
    import torch

    tasks = _task_names(args.tasks)
    if not tasks and args.length_following is None:
        raise BadInput("nothing to evaluate: give --tasks and/or --length-following")
    hf_dir = Path(args.hf_dir)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(args.out) if args.out else None
    if tasks:
        from trainer.evaluation.lm_eval import default_output, run_lm_eval

        out = (out_dir / "lm_eval.json") if out_dir else default_output(hf_dir)
        _print_lm_eval(run_lm_eval(hf_dir, tasks, args.include_path, args.limit, out, args.batch_size, device,
                                   args.apply_chat_template, args.num_fewshot))
    if args.length_following is not None:
        from trainer.evaluation.length_following import length_following_score, read_records
        from trainer.evaluation.lm_eval import default_output

        result = length_following_score(hf_dir, read_records(args.length_following), args.max_new_tokens, device)
        out = (out_dir or default_output(hf_dir).parent) / "length_following.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"file": str(args.length_following), **result}, indent=2, ensure_ascii=False))
        os.replace(tmp, out)
        score = "—" if result["score"] is None else f"{result['score']:.1f}"
        print(f"length following: mean S_l {score} over {result['n']} prompts ({result['skipped']} without a "
              f"required length skipped)")
        print(f"length-following results: {out}")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        run(args)
    except Exception as err:  # noqa: BLE001  (a diagnosed error: its one-line message and exit code)
        return report_failure("stagecraft eval", err)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
