"""The project's own lm-evaluation-harness task: multiple choice over the synthetic task families.

``stagecraft_synthetic_mc``: each item is a synthetic prompt (``Reverse: abc``, ``Count a in
abca``, ...; trainer/data/synthetic.py) with four choices, the right answer and three answers of
other prompts of the same family that the family's checker rejects for this prompt (``add 5 and 2``
is not answered by ``3 + 4``, though both make 7), so every choice is well-formed and exactly one is
right. lm-eval scores it by log-likelihood (``acc``: the choice with the highest summed
log-probability; ``acc_norm``: per byte), the same way it scores ARC or MMLU, so a stagecraft model
can be checked through the harness end to end with no downloads.

The data is generated, deterministically from (n, seed), into a directory next to a task YAML that
names it by absolute path: lm-eval hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset``,
which resolves a relative path against the working directory, not the YAML's. Real benchmarks are
pointed at local copies the same way (docs/evaluation.md).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from trainer.data.synthetic import TASK_FAMILIES, make_sample, verify, write_jsonl

TASK = "stagecraft_synthetic_mc"
N_CHOICES = 4

_YAML = """\
# Written by trainer/evaluation/tasks.py: {n} items, seed {seed}. Generated, do not edit.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def synthetic_mc_items(n: int, seed: int = 0, families: list[str] | None = None) -> list[dict]:
    """``n`` items ``{"question", "choices", "answer" (index), "family"}``, families in turn."""
    names = list(families or TASK_FAMILIES)
    rng = random.Random(seed)
    items = []
    for i in range(n):
        family = names[i % len(names)]
        question, right = make_sample(family, rng)
        wrong: list[str] = []
        for _ in range(1000):  # distinct answers of other prompts that are wrong for this one
            if len(wrong) == N_CHOICES - 1:
                break
            _, other = make_sample(family, rng)
            if not verify(family, question, other) and other not in wrong:
                wrong.append(other)
        else:
            raise ValueError(f"family {family}: could not draw {N_CHOICES - 1} distinct wrong answers")
        choices = [right, *wrong]
        rng.shuffle(choices)
        items.append({"question": question, "choices": choices, "answer": choices.index(right), "family": family})
    return items


def write_task(directory: str | Path, items: list[dict] | None = None, n: int = 70, seed: int = 0,
               task: str = TASK) -> Path:
    """Write ``<directory>/<task>.jsonl`` and the task YAML naming it; returns the YAML's path.
    ``items`` defaults to :func:`synthetic_mc_items` (n, seed)."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    items = items if items is not None else synthetic_mc_items(n, seed)
    data = directory / f"{task}.jsonl"
    write_jsonl(data, items)
    yaml = directory / f"{task}.yaml"
    yaml.write_text(_YAML.format(n=len(items), seed=seed, task=task, data=json.dumps(str(data))))
    return yaml
