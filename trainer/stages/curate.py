"""A curation tool as a stage: the stage's data through ``trainer.curation.run_tool``, its kept records
the stage's dataset (``<stage dir>/kept.jsonl``) with the tool's report beside it.

Rank 0 runs the tool (it is a pass over records, not a training job; reward-filter scores on rank 0's
device) while the other ranks wait; every rank returns the same result. Complete once COMPLETE.json
is written, so a rerun of the recipe reuses it.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainer.parallel.topology import Topology
from trainer.stages import common


def run(cfg: DictConfig, topology: Topology) -> dict:
    from trainer.curation import run_tool

    stage = cfg.stage
    out, finished = common.start(cfg, topology)
    if finished is not None:
        return finished
    result = None
    if topology.is_main:
        options = OmegaConf.to_container(stage.options, resolve=True)
        if stage.tool == "reward-filter" and stage.get("reward_model"):
            options.setdefault("reward_model", stage.reward_model)
        report = run_tool(stage.tool, [Path(p) for p in cfg.data.train], out, options)
        result = {"stage": stage.name, "type": "curate", "tool": stage.tool, "records": report["records"],
                  "kept": report["kept"], "output": report["output"], "report": str(out / "report.md")}
        common.write_stage_result(out, result)
    return common.from_main(result, topology)
