"""`stagecraft data <tool> INPUT.jsonl... -o OUT [options]`: the curation tools on the command line.

Each tool's flags are generated from its `Options` dataclass (`trainer.curation.common.option`), the
same fields `run_tool` takes as a dict, so the CLI and the library cannot drift apart. Exit codes are
the run's (trainer/runtime/errors.py): 0 done, 2 bad input (a bad record names ``file:line``, a bad
option names its flag) with ``stagecraft: error: ...`` on stderr; argparse's own usage errors are 2 too.

Besides the tools, ``longwriter-data`` writes the synthetic LongWriter-style set of
trainer/curation/longwriter_data.py (records + their ground truth), the length filter's showcase.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import trainer.curation
from trainer.curation import TOOLS, longwriter_data, run_tool, tool_module
from trainer.curation.common import flag
from trainer.runtime.errors import report_failure

_EPILOG = ("Reads chat {\"messages\"}, preference {\"prompt\",\"chosen\",\"rejected\"}, candidates "
           "{\"prompt\",\"responses\"} and prompt/response rows as the tool allows. Writes OUT/kept.jsonl, "
           "OUT/report.md, OUT/report.json (+ PNGs). docs/curation.md has every rule.")


def _first_paragraph(doc: str | None) -> str:
    return (doc or "").strip().split("\n\n")[0]


def _add_options(parser: argparse.ArgumentParser, options_cls) -> None:
    for f in dataclasses.fields(options_cls):
        meta = f.metadata
        kwargs = {"dest": f.name, "help": meta["help"]}
        if meta["type"] is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
            kwargs["help"] += f" (default: {'on' if f.default else 'off'})"
        else:
            kwargs.update(type=meta["type"], default=argparse.SUPPRESS)
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
            else:
                kwargs["metavar"] = f.name.upper()
            if meta["many"]:
                kwargs["action"] = "append"
            elif f.default is not None:
                kwargs["help"] += f" (default: {f.default})"
        parser.add_argument(flag(f.name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagecraft data", description=_first_paragraph(trainer.curation.__doc__),
                                     epilog=_EPILOG)
    sub = parser.add_subparsers(dest="tool", required=True, metavar="TOOL")
    for name in TOOLS:
        module = tool_module(name)
        p = sub.add_parser(name, help=module.SUMMARY, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
        p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT.jsonl")
        p.add_argument("-o", "--output-dir", required=True, type=Path, help="directory for the outputs")
        _add_options(p, module.Options)
    gen = sub.add_parser("longwriter-data", help="write synthetic LongWriter-style SFT data with known lengths",
                         description=longwriter_data.__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("-o", "--output-dir", required=True, type=Path,
                     help="writes longwriter.jsonl and truth.jsonl (one ground-truth line per record)")
    gen.add_argument("--n", type=int, default=1000, help="records (default: 1000)")
    gen.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    gen.add_argument("--max-required", type=int, default=3000, help="largest asked length (default: 3000)")
    return parser


def _longwriter_data(args: argparse.Namespace) -> None:
    from trainer.data.synthetic import write_jsonl

    records, truths = longwriter_data.generate(args.n, args.seed, max_required=args.max_required)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.output_dir / "longwriter.jsonl", records)
    write_jsonl(args.output_dir / "truth.jsonl", (dataclasses.asdict(t) for t in truths))
    print(f"longwriter-data: {len(records)} records -> {args.output_dir / 'longwriter.jsonl'}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2): argparse has printed it
        return int(stop.code or 0)
    try:
        if args.tool == "longwriter-data":
            _longwriter_data(args)
            return 0
        names = {f.name for f in dataclasses.fields(tool_module(args.tool).Options)}
        options = {k: v for k, v in vars(args).items() if k in names}
        report = run_tool(args.tool, args.inputs, args.output_dir, options)
    except Exception as err:  # noqa: BLE001  (bad input: one line and its code; anything else: a traceback)
        return report_failure("stagecraft", err)
    print(report["summary"])
    print(f"report: {Path(args.output_dir) / 'report.md'}")
    if report["output"]:
        print(f"kept: {report['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

