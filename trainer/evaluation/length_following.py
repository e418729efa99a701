"""LongWriter-style length following: does the model write as long as it was asked to?

For each held-out prompt with a required length, the model's greedy continuation is measured in
LongWriter's unit (:func:`trainer.data.produced_length`: CJK ideographs plus English words) and
scored with their S_l (:func:`trainer.data.length_score`: 100 at the asked length, 0 at a third of
it or four times it); the result is the mean S_l (Bai et al. 2024, LongBench-Write's S_l).

Records (JSONL, one a line): ``{"prompt": str}`` or ``{"messages": [user/system turns]}``, and
the required length as ``"required_length"`` or LongBench-Write's ``"length"``; without either it is
read from the instruction (:func:`trainer.data.required_length`, e.g. "in about 300 words"). A record
with no requirement at all is skipped and counted, not scored.

The prompt is rendered with the tokenizer's chat template (generation prompt on) when it has one,
since that is how a chat-tuned stage answers; generation stops at EOS or ``max_new_tokens``. Prompts
run one at a time: no padding, so each generation is exactly what that prompt alone produces.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.data import length_score, produced_length, required_length
from trainer.runtime.errors import BadInput


def read_records(path: str | Path) -> list[dict]:
    """The records of a JSONL file; a malformed line is BadInput naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--length-following: {path} not found")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadInput(f"{path}:{lineno}: not JSON ({err})") from None
        if not isinstance(record, dict) or not ("prompt" in record or "messages" in record):
            raise BadInput(f"{path}:{lineno}: a record needs \"prompt\" (a string) or \"messages\"")
        records.append(record)
    return records


def _messages(record: dict) -> list[dict]:
    if "messages" in record:
        return [m for m in record["messages"] if m["role"] != "assistant"]
    return [{"role": "user", "content": record["prompt"]}]


def _required(record: dict) -> int | None:
    for key in ("required_length", "length"):
        if record.get(key) is not None:
            return int(record[key])
    return required_length(" ".join(m["content"] for m in _messages(record) if m["role"] == "user"))


def _prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n\n".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=tokenizer.chat_template is None)["input_ids"]


@torch.no_grad()
def generate(model, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """The greedy continuation of the rendered prompt, special tokens dropped."""
    ids = torch.tensor([_prompt_ids(tokenizer, messages)], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def length_following_score(model_dir: str | Path, records: list[dict], max_new_tokens: int,
                           device: str | None = None) -> dict:
    """``{"score": mean S_l over scored records, "n": scored, "skipped": records without a required
    length, "items": [{"required", "produced", "score", "response"}, ...]}`` for the HF model in
    ``model_dir``. ``score`` is None when no record could be scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise BadInput(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32  # CPUs are slow at bf16
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype).to(device)
    model.eval()
    items = [score_record(model, tokenizer, record, max_new_tokens) for record in records]
    scored = [i for i in items if i is not None]
    score = sum(i["score"] for i in scored) / len(scored) if scored else None
    return {"score": score, "n": len(scored), "skipped": len(items) - len(scored), "items": scored}


def score_record(model, tokenizer, record: dict, max_new_tokens: int) -> dict | None:
    """``{"required", "produced", "score", "response"}`` for one record, or None when it asks for no
    length. (The recipe's per-stage eval calls this on each rank's share of the prompts.)"""
    required = _required(record)
    if required is None or required <= 0:
        return None
    response = generate(model, tokenizer, _messages(record), max_new_tokens)
    produced = produced_length(response)
    return {"required": required, "produced": produced, "score": length_score(required, produced),
            "response": response}
