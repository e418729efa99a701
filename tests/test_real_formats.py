"""Real users' models and files ("recipes v2"): several EOS ids in generation_config.json, recipes whose
sources are all JSONL files, and chat templates that append EOS after the last turn (Phi-3)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tests.test_data import CONVERSATION
from trainer.config.schema import DataSourceConfig, ParallelConfig
from trainer.data import TemplateError, build_embedded_tokenizer, load_tokenizer, tokenize_chat
from trainer.data.chat import tokenize_prompt
from trainer.data.preference import tokenize_pair
from trainer.data.records import read_jsonl
from trainer.data.synthetic import write_jsonl
from trainer.parallel.deepspeed import DeepSpeedStrategy
from trainer.parallel.strategy import at_stop
from trainer.recipe.data import source_files, stage_data
from trainer.recipe.evaluate import HFRunner
from trainer.stages.evaluation import cut_at_stop, generation_accuracy, stop_token_ids

VOCAB = 400
PROMPT = [{"role": "user", "content": "Reverse: abc"}]
NEW = 8  # max_new_tokens


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="module")
def tok(cache):
    return build_embedded_tokenizer(VOCAB, cache)


# ---- several EOS ids ----------------------------------------------------------------------------------


def _greedy(model, tok, eos) -> list[int]:
    ids = torch.tensor([tokenize_prompt(tok, PROMPT)])
    out = HFRunner(model).generate(ids, torch.ones_like(ids), NEW, eos, tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def multi_eos(tok, tmp_path_factory):
    """A tiny random Llama saved twice: as built (generation_config derived from its config) and with
    a generation_config.json whose eos list holds the token it greedily emits at step k >= 2.
    Returns (plain dir, multi-eos dir, k, the full greedy continuation, the eos list)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tok))
    model = LlamaForCausalLM(config).eval()
    greedy = _greedy(model, tok, tok.eos_token_id)
    assert tok.eos_token_id not in greedy, "pick another seed: the random model emits eos"
    # The first token that appears at step >= 2 and never before: stopping there is unambiguous.
    k = next(t for t in range(2, NEW) if greedy[t] not in greedy[:t])
    plain, multi = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("multi")
    model.save_pretrained(plain)
    model.save_pretrained(multi)
    eos_list = [VOCAB + 5, greedy[k], VOCAB + 9]  # Phi-3 style: [32000, 32001, 32007]
    (multi / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_list}))
    return plain, multi, k, greedy, eos_list


def _load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()


def test_stop_ids_are_tokenizer_eos_plus_generation_config_eos(tok, multi_eos):
    plain, multi, k, greedy, eos_list = multi_eos
    assert stop_token_ids(tok, _load(multi)) == [tok.eos_token_id, *eos_list]
    # Built from config (or saved without the file): the derived default eos (2 = <s> here) is not used.
    assert stop_token_ids(tok, _load(plain)) == [tok.eos_token_id]
    assert stop_token_ids(tok, torch.nn.Linear(2, 2)) == [tok.eos_token_id]  # no generation_config at all


def test_generation_stops_at_any_eos_and_the_response_is_cut_there(tok, multi_eos):
    _, multi, k, greedy, _ = multi_eos
    model = _load(multi)
    out = _greedy(model, tok, stop_token_ids(tok, model))
    assert out == greedy[: k + 1]  # stopped right after emitting the step-k token
    assert cut_at_stop(out, stop_token_ids(tok, model)) == greedy[:k]
    assert cut_at_stop([1, 2, 3], [7]) == [1, 2, 3]


def test_deepspeed_strategy_generate_passes_every_eos(tok, multi_eos):
    """The strategy's own method over a stand-in engine (generate never touches DeepSpeed itself)."""
    _, multi, k, greedy, _ = multi_eos
    model = _load(multi)
    strategy = DeepSpeedStrategy(OmegaConf.structured(ParallelConfig), SimpleNamespace(world_size=1))
    strategy.engine = SimpleNamespace(module=model)
    ids = torch.tensor([tokenize_prompt(tok, PROMPT)])
    out = strategy.generate(ids, torch.ones_like(ids), NEW, stop_token_ids(tok, model), tok.pad_token_id)
    assert out[0, ids.shape[1]:].tolist() == greedy[: k + 1]


@pytest.fixture(scope="module")
def one_process_group(tmp_path_factory):
    if dist.is_initialized():  # another test module left one: use it
        yield
        return
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_generation_accuracy_scores_a_multi_eos_model(tok, multi_eos, one_process_group):
    plain, multi, k, greedy, _ = multi_eos
    answer = tok.decode(greedy[:k], skip_special_tokens=True)
    records = [{"messages": [*PROMPT, {"role": "assistant", "content": answer}]}]
    topology = SimpleNamespace(dp=1, dp_rank=0, device=torch.device("cpu"), dp_group=None)
    found = generation_accuracy(HFRunner(_load(multi)), records, tok, topology, NEW, batch_size=2)
    assert found["accuracy"] == 1.0 and found["response_tokens"] == k
    # The same weights stopping only at the tokenizer's eos run to the limit: the reported bug.
    found = generation_accuracy(HFRunner(_load(plain)), records, tok, topology, NEW, batch_size=2)
    assert found["accuracy"] == 0.0 and found["response_tokens"] == NEW


def test_at_stop_marks_any_stop_id():
    """Megatron's greedy loop ends a row where this is true."""
    tokens = torch.tensor([5, 7, 9, 2])
    assert at_stop(tokens, [7, 2]).tolist() == [False, True, False, True]
    assert at_stop(tokens, 9).tolist() == [False, False, True, False]


# ---- recipes whose sources are all JSONL ----------------------------------------------------------------


def _chat_records(tag: str, n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{tag} {i}"}, {"role": "assistant", "content": "ok"}]}
            for i in range(n)]


def test_all_jsonl_recipe_writes_its_mix_into_a_fresh_run_dir(tmp_path):
    files = {}
    for name, n in (("general", 20), ("code", 10)):
        for split in ("train", "eval"):
            files[name, split] = tmp_path / "in" / f"{name}_{split}.jsonl"
            files[name, split].parent.mkdir(exist_ok=True)
            write_jsonl(files[name, split], _chat_records(f"{name}-{split}", n))
    sources = {name: OmegaConf.structured(DataSourceConfig(train=[str(files[name, "train"])],
                                                           eval=[str(files[name, "eval"])]))
               for name in ("general", "code")}
    recipe = OmegaConf.create({"sources": sources})
    data_dir = tmp_path / "runs" / "jsonl" / "data"  # nothing under runs/ exists yet

    files_of = lambda name: source_files(name, recipe.sources[name], data_dir)  # noqa: E731
    path, evals, proportions = stage_data("sft", (("general", 0.8), ("code", 0.2)), files_of, data_dir, seed=0)
    assert path == data_dir / "sft_train.jsonl" and not (data_dir / "sources").exists()
    records = read_jsonl(path, lambda r: None)[0]
    assert len(records) == 20 + 5  # general whole, code at 0.2/0.8 of it
    assert evals == [files["general", "eval"], files["code", "eval"]]
    assert proportions == json.loads((data_dir / "sft_mix.json").read_text()) == {"general": 0.8, "code": 0.2}
    assert source_files("code", recipe.sources.code, data_dir)[1] == [files["code", "eval"]]


# ---- chat templates that append EOS after the last turn (Phi-3) -----------------------------------------

# Phi-3's template shape on the embedded tokenizer's markers: the embedded template plus EOS at the end.
PHI3 = (
    "{% for message in messages %}<|{{ message.role }}|>\n{{ message.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)


def _phi3(cache: Path, eos: str):
    """A fresh embedded tokenizer with the Phi-3-like template; eos "<|endoftext|>" as in Phi-3 itself."""
    phi3 = build_embedded_tokenizer(VOCAB, cache)
    if eos != phi3.eos_token:
        phi3.add_special_tokens({"eos_token": eos})
    phi3.chat_template = PHI3
    return phi3


def _masked(example: dict) -> list[int]:
    return [t for t, m in zip(example["input_ids"], example["assistant_mask"]) if m]


@pytest.mark.parametrize("eos", ["<|end|>", "<|endoftext|>"])
def test_phi3_template_masks_assistant_content_and_end_of_turn(tok, cache, eos):
    phi3 = _phi3(cache, eos)
    got = tokenize_chat(phi3, CONVERSATION, max_length=200)
    base = tokenize_chat(tok, CONVERSATION, max_length=200)  # the same turns without the final EOS
    eos_id = phi3.convert_tokens_to_ids(eos)
    assert got["input_ids"] == base["input_ids"] + [eos_id]
    assert got["assistant_mask"] == base["assistant_mask"] + [0]  # the final EOS is never generated
    end = phi3.convert_tokens_to_ids("<|end|>")
    content = [phi3.encode(c, add_special_tokens=False) for c in ("cba", "AB C")]
    assert _masked(got) == content[0] + [end] + content[1] + [end]


def test_phi3_template_single_turn_and_preference_pairs(cache):
    phi3 = _phi3(cache, "<|endoftext|>")
    end, eos = phi3.convert_tokens_to_ids("<|end|>"), phi3.eos_token_id
    single = tokenize_chat(phi3, CONVERSATION[1:3], max_length=200)
    assert _masked(single) == phi3.encode("cba", add_special_tokens=False) + [end]
    assert single["input_ids"][-1] == eos and single["assistant_mask"][-1] == 0
    pair = tokenize_pair(phi3, {"prompt": "Reverse: abc", "chosen": "cba", "rejected": "abc"}, 200)
    assert _masked(pair["chosen"]) == phi3.encode("cba", add_special_tokens=False) + [end]
    assert _masked(pair["rejected"]) == phi3.encode("abc", add_special_tokens=False) + [end]


def test_unstable_template_refusal_names_the_tokenizer_and_the_fix(tok, tmp_path):
    saved = tmp_path / "odd_tokenizer"
    tok.save_pretrained(saved)
    odd = load_tokenizer(str(saved))
    # "!" after the last message only: plain text, not a special token, so no mask can be trusted.
    odd.chat_template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}\n{% endfor %}"
    with pytest.raises(TemplateError, match="not prefix-stable at messages\\[2\\]") as err:
        tokenize_chat(odd, CONVERSATION, max_length=200)
    assert str(saved) in str(err.value) and "model.tokenizer" in str(err.value)
    assert "chat_template" in str(err.value)
