"""Run a recipe: its stages in order, each consuming the artifacts earlier stages produced (models to
start from, reference or score with; datasets to train on: trainer/recipe/plan.py).

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
from trainer.logging.metrics import dumps, log_report
from trainer.models import build_model
from trainer.parallel.topology import Topology
from trainer.recipe.data import realised_mix, source_files, stage_train
from trainer.recipe.evaluate import evaluate_model, evaluate_reward_model
from trainer.recipe.plan import PlannedStage, plan, stage_config
from trainer.stages import common, get_stage
from trainer.stages.annotate import ANNOTATE_METRICS
from trainer.stages.registry import DATASET, POLICY, REWARD_MODEL

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


def _write_gguf(st: PlannedStage, hf_dir: Path, topology: Topology) -> list[str]:
    """The stage's ``gguf`` files beside its export, written by rank 0; a file already there is
    complete (each is written atomically), so a rerun writes only what is missing."""
    from trainer.export.gguf import default_output, export_gguf

    paths = [default_output(hf_dir, t) for t in st.gguf]
    if topology.is_main:
        for t, path in zip(st.gguf, paths):
            if not path.is_file():
                export_gguf(hf_dir, path, t)
    topology.barrier()
    return [str(p) for p in paths]


def _evaluate(cfg: DictConfig, st: PlannedStage | None, hf_dir: Path | None, result: dict,
              topology: Topology) -> dict:
    """Held-out numbers of one stage's artifact, cached in its directory (a rerun does not repeat it):
    a policy's generation and ranking accuracy, a reward model's ranking of held-out pairs, an annotate
    stage's counts."""
    recipe = cfg.recipe
    produces = POLICY if st is None else st.produces
    if produces == DATASET:  # an annotate stage's reward statistics, a curate stage's kept share
        if result.get("type") == "curate":
            return {"data/kept": result["kept"], "data/kept_fraction": result["kept"] / max(1, result["records"])}
        return {f"rewards/{k}": v for k, v in result.items() if k in ANNOTATE_METRICS}
    if not recipe.eval.enabled or produces not in (POLICY, REWARD_MODEL):
        return {}
    name = "base" if st is None else st.name
    path = Path(cfg.run.dir) / "stages" / name / "eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    data_dir = Path(cfg.run.dir) / "data"
    sources = {s: (recipe.sources[s].kind, source_files(s, recipe.sources[s], data_dir)[1])
               for s in recipe.eval.sources}
    if produces == POLICY:
        metrics = evaluate_model(hf_dir, sources, recipe.eval, cfg.data.max_length, topology)
    else:
        metrics = evaluate_reward_model(hf_dir, sources, recipe.eval, cfg.data.max_length, topology)
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
    if topology.is_main:  # the synthetic sources are written once, by rank 0, before anyone reads them
        common.save_config(cfg, run_dir)
        for name, source in recipe.sources.items():
            source_files(name, source, data_dir)
    topology.barrier()
    # Artifacts by stage name: model directories (policies, reward models) and datasets (train and
    # eval files; an annotate stage's eval files are those of the pairs it scored).
    exports: dict[str, Path] = {"base": _base_model(cfg, topology)}
    datasets: dict[str, tuple[list[Path], list[Path]]] = {}

    def files(source: str) -> tuple[list[Path], list[Path]]:
        return datasets[source] if source in datasets else source_files(source, recipe.sources[source], data_dir)

    evals = {"base": _evaluate(cfg, None, exports["base"], {}, topology)}
    results, mixes, ggufs = {}, {}, {}
    for st in stages:
        eval_files = [p for s, _ in st.data for p in files(s)[1]]
        train, mix = stage_train(st, files, data_dir, topology, cfg.run.seed + st.iteration)
        results[st.name] = get_stage(st.type)(stage_config(cfg, st, exports, train, eval_files, mix), topology)
        mixes[st.name] = realised_mix(st, results[st.name], data_dir)
        log.info("stage %s (%s): data mix %s", st.name, st.type, mixes[st.name])
        if st.produces == DATASET:
            datasets[st.name] = ([Path(results[st.name]["output"])], eval_files)
        elif "hf" in results[st.name]:
            exports[st.name] = Path(results[st.name]["hf"])
            ggufs[st.name] = _write_gguf(st, exports[st.name], topology)
        evals[st.name] = _evaluate(cfg, st, exports.get(st.name), results[st.name], topology)
    summary = {
        "recipe": recipe.name,
        "base": {"model": str(exports["base"]), "eval": evals["base"]},
        "stages": [{"name": st.name, "type": st.type, "produces": st.produces, "init": st.init,
                    "reference": st.reference, "reward_model": st.reward_model, "data_mix": mixes[st.name],
                    "result": results[st.name], "eval": evals[st.name], "gguf": ggufs.get(st.name, [])}
                   for st in stages],
    }
    if topology.is_main:
        summary = write_report(run_dir, summary, OmegaConf.to_container(recipe.claims, resolve=True))
        log_report(run_dir, cfg, summary["plots"])  # into the run's wandb group, beside the stages' runs
    topology.barrier()
    return summary
