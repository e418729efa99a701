"""Run a recipe: its stages in order, each starting from (and referencing) earlier stages' exports.

Resumable at two levels: a stage with a COMPLETE.json is skipped (its export and eval are reused), and
an unfinished stage resumes from its latest checkpoint (the stage loops' own checkpoint.resume=auto).
After every stage the export is evaluated on the recipe's held-out sets; at the end rank 0 writes
summary.json, report.md and plots.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainer.checkpoint import write_text_atomic
from trainer.logging.report import write_report
from trainer.logging.metrics import dumps
from trainer.models import build_model
from trainer.parallel.topology import Topology
from trainer.recipe.data import source_files, stage_data
from trainer.recipe.evaluate import evaluate_model
from trainer.recipe.plan import PlannedStage, plan
from trainer.stages import common, get_stage

log = logging.getLogger(__name__)


def _base_model(cfg: DictConfig, topology: Topology) -> Path:
    """The recipe's starting model as an HF directory: model.path, or the built-from-config model
    exported once (with the embedded tokenizer) so every stage loads its start from a path."""
    if cfg.model.path is not None:
        return Path(cfg.model.path)
    out = Path(cfg.run.dir) / "stages" / "base" / "hf"
    if topology.is_main and not (out / "config.json").is_file():
        tokenizer = common.build_tokenizer(cfg)
        model = build_model(cfg.model, len(tokenizer), cfg.run.seed)
        tmp = out.with_name("hf.tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    topology.barrier()
    return out


def _stage_cfg(cfg: DictConfig, st: PlannedStage, exports: dict[str, Path], train: Path, evals: list[Path]
               ) -> DictConfig:
    """The root config as the stage loop expects it: this stage's config, model and data."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("recipe")
    stage_cfg = OmegaConf.create(plain)
    stage_cfg.stage = st.config
    path = lambda choice: str(exports.get(choice, choice))  # noqa: E731  (a stage name, base, or a path)
    stage_cfg.model.path = path(st.init)
    stage_cfg.model.tokenizer = None
    if st.reference is not None:
        stage_cfg.stage.reference = path(st.reference)
    stage_cfg.data.train = [str(train)]
    stage_cfg.data.eval = [str(p) for p in evals]
    return stage_cfg


def _evaluate(cfg: DictConfig, name: str, hf_dir: Path, topology: Topology) -> dict:
    """Eval of one stage's export, cached in its directory (a rerun does not repeat it)."""
    recipe = cfg.recipe
    if not recipe.eval.enabled:
        return {}
    path = Path(cfg.run.dir) / "stages" / name / "eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    data_dir = Path(cfg.run.dir) / "data"
    sources = {s: (recipe.sources[s].kind, source_files(s, recipe.sources[s], data_dir)[1])
               for s in recipe.eval.sources}
    metrics = evaluate_model(hf_dir, sources, recipe.eval, cfg.data.max_length, topology)
    if topology.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, dumps(metrics, indent=2))
    log.info("eval after %s: %s", name, {k: round(v, 4) for k, v in metrics.items() if k.endswith("accuracy")})
    return metrics


def run_recipe(cfg: DictConfig, topology: Topology) -> dict:
    recipe = cfg.recipe
    stages = plan(recipe)
    run_dir = Path(cfg.run.dir)
    data_dir = run_dir / "data"
    # Rank 0 writes every source and every stage's mix up front (deterministic: a rerun rewrites the
    # same bytes); the other ranks wait and read.
    mixes = {}
    if topology.is_main:
        common.save_config(cfg, run_dir)
        for st in stages:
            mixes[st.name] = stage_data(st.name, st.data, recipe, data_dir, cfg.run.seed + st.iteration)
    topology.barrier()
    for st in stages:
        mixes[st.name] = (data_dir / f"{st.name}_train.jsonl",
                          [p for s, _ in st.data for p in source_files(s, recipe.sources[s], data_dir)[1]],
                          json.loads((data_dir / f"{st.name}_mix.json").read_text()))

    exports: dict[str, Path] = {"base": _base_model(cfg, topology)}
    evals = {"base": _evaluate(cfg, "base", exports["base"], topology)}
    results = {}
    for st in stages:
        train, eval_files, proportions = mixes[st.name]
        log.info("stage %s (%s): data mix %s", st.name, st.type, proportions)
        results[st.name] = get_stage(st.type)(_stage_cfg(cfg, st, exports, train, eval_files), topology)
        exports[st.name] = Path(results[st.name]["hf"])
        evals[st.name] = _evaluate(cfg, st.name, exports[st.name], topology)
    summary = {
        "recipe": recipe.name,
        "base": {"model": str(exports["base"]), "eval": evals["base"]},
        "stages": [{"name": st.name, "type": st.type, "init": st.init, "reference": st.reference,
                    "data_mix": mixes[st.name][2], "result": results[st.name], "eval": evals[st.name]}
                   for st in stages],
    }
    if topology.is_main:
        summary = write_report(run_dir, summary, OmegaConf.to_container(recipe.claims, resolve=True))
    topology.barrier()
    return summary
