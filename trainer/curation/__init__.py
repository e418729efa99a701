"""Data-curation tools: `stagecraft data <tool> ...` on the command line, `run_tool` from code.

Tools (one module each; docs/curation.md gives every rule and option):

    length-filter   LongWriter's 2-step length filter (requirement present, then S_l >= threshold)
    reward-filter   Nemotron-style: keep responses a reward model scores high; or judge pairs/candidates
    dedup           exact and MinHash-LSH near-duplicate removal over prompts or whole conversations
    select          DSIR importance resampling of a pool towards a target set (hashed n-grams)
    stats           length histograms, turn/role counts, language mix, bad-record counts

Library API, what a recipe stage calls::

    from trainer.curation import run_tool
    report = run_tool("length-filter", [Path("sft.jsonl")], Path("out/"), {"threshold": 80})
    report["output"]   # out/kept.jsonl, the kept records (None for stats, which keeps nothing)

`options` holds the same names as the CLI flags with ``_`` for ``-`` (``--top-fraction`` is
``top_fraction``); an unknown name or a wrong type is `BadInput` naming both spellings. The inputs are
read as training reads them (a bad record is a DataError naming ``file:line``, or a counted skip with
``on_bad_record="skip"``). Written into ``output_dir``: ``kept.jsonl``, the PNGs, ``report.md`` and
``report.json`` last (trainer/curation/report.py says why). The returned dict is ``report.json``:
``tool``, ``inputs``, ``options``, ``records``, ``bad_records``, ``bad_by_file``, ``output``, ``kept``,
``summary`` plus the tool's own fields. Every tool is deterministic: same inputs and options (including
``seed``), same bytes out.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from types import ModuleType

from trainer.runtime.errors import BadInput

TOOLS = {
    "length-filter": "trainer.curation.length_filter",
    "reward-filter": "trainer.curation.reward_filter",
    "dedup": "trainer.curation.dedup",
    "select": "trainer.curation.select",
    "stats": "trainer.curation.stats",
}


def tool_module(name: str) -> ModuleType:
    """The module of tool `name` (imported on first use: reward-filter pulls in torch models)."""
    if name not in TOOLS:
        raise BadInput(f"unknown curation tool {name!r} (known: {', '.join(TOOLS)})")
    return importlib.import_module(TOOLS[name])


def run_tool(name: str, inputs: list[Path], output_dir: Path, options: dict | None = None) -> dict:
    """Run tool `name` over the JSONL files `inputs`, writing into `output_dir`; returns the report."""
    from trainer.curation.common import parse_options, read_inputs
    from trainer.curation.report import write_kept, write_report

    tool = tool_module(name)
    opts = parse_options(tool.Options, name, options)
    output_dir = Path(output_dir)
    data = read_inputs(list(inputs), name, tool.kinds(opts), opts.on_bad_record)
    output_dir.mkdir(parents=True, exist_ok=True)
    result = tool.run(data, opts, output_dir)
    report = {"tool": name, "inputs": [str(p) for p in inputs], "options": dataclasses.asdict(opts),
              "records": len(data.rows), "bad_records": data.bad_records, "bad_by_file": data.bad_by_file,
              "output": None, "kept": None, "summary": result.summary}
    if result.kept is not None:
        report["output"] = str(write_kept(output_dir, result.kept))
        report["kept"] = len(result.kept)
    report.update(result.report)
    report["plots"] = list(result.plots)
    write_report(output_dir, report, result.lines, result.plots)
    return report


__all__ = ["TOOLS", "run_tool", "tool_module"]
