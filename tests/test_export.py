"""GGUF export (trainer/export/): tiny random Llama and Qwen2 models with the embedded tokenizer.

Without llama-cpp-python these tests read the file back with gguf-py and check every tensor and key
against the HF model; with it (the ``gguf-test`` extra) llama.cpp itself loads the file and must
produce the same greedy tokens and logits as transformers, and tokenise text as the HF tokenizer does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from trainer.data.tokenizer import build_embedded_tokenizer
from trainer.export.gguf import export_gguf, permute_qk
from trainer.runtime.errors import BadInput

# f16 weights are exact here (the HF weights are rounded to f16 before saving), so what is left is
# llama.cpp's own arithmetic (its CPU matmuls round activations to f16). Measured over the 8 prompt
# positions x 400 logits (std 2.4, max |logit| 9.8): max |Δ| 0.0163 (llama) / 0.0159 (qwen2), mean
# 0.0022 / 0.0025. Q8_0 on top of that: max |Δ| 0.49 / 0.50, mean 0.078 / 0.069 (greedy tokens still equal).
F16_MAX_TOL, F16_MEAN_TOL, Q8_MAX_TOL = 0.03, 0.005, 1.0
PROMPT = "Reverse: hello"


def _tiny(arch: str, out: Path, tokenizer, **extra) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, initializer_range=0.3, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # f16-representable weights: the f16 file then holds them exactly
        for p in model.parameters():
            p.copy_(p.half().float())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return build_embedded_tokenizer(400, cache_dir / "tokenizers")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    # Llama untied with its own lm_head; Qwen2 tied (as its small models are) with q/k/v biases.
    dirs = {"llama": _tiny("llama", root / "llama", tokenizer, tie_word_embeddings=False),
            "qwen2": _tiny("qwen2", root / "qwen2", tokenizer, tie_word_embeddings=True)}
    with torch.no_grad():  # nonzero biases, so a bias written wrongly shows in the logits
        from transformers import AutoModelForCausalLM

        qwen = AutoModelForCausalLM.from_pretrained(dirs["qwen2"])
        for name, p in qwen.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p).half().float())
        qwen.save_pretrained(dirs["qwen2"])
    return dirs


@pytest.fixture(scope="module")
def f16_files(models) -> dict[str, Path]:
    return {arch: export_gguf(d, d / "model-f16.gguf", "f16") for arch, d in models.items()}


def _fields(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def _hf_state(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(model_dir / "model.safetensors")).items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_metadata_and_tensors_match_the_hf_model(arch, models, f16_files, tokenizer):
    fields, tensors = _fields(f16_files[arch])
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == 2 and fields[f"{arch}.embedding_length"] == 64
    assert fields[f"{arch}.attention.head_count"] == 4 and fields[f"{arch}.attention.head_count_kv"] == 2
    assert fields[f"{arch}.rope.dimension_count"] == 16 and fields["general.file_type"] == 1
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is False
    assert fields["tokenizer.ggml.tokens"] == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id == 2
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|end|>")
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    types = fields["tokenizer.ggml.token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<0x41>")] == 6 and types[tokenizer.unk_token_id] == 2
    assert types[tokenizer.convert_tokens_to_ids("<|user|>")] == 3

    state = _hf_state(models[arch])
    assert ("output.weight" in tensors) == (arch == "llama")  # tied: llama.cpp reuses token_embd
    expected = {"token_embd.weight": state["model.embed_tokens.weight"],
                "blk.1.attn_q.weight": state["model.layers.1.self_attn.q_proj.weight"],
                "blk.1.attn_k.weight": state["model.layers.1.self_attn.k_proj.weight"],
                "blk.0.ffn_down.weight": state["model.layers.0.mlp.down_proj.weight"],
                "blk.0.attn_norm.weight": state["model.layers.0.input_layernorm.weight"]}
    if arch == "llama":  # interleaved RoPE pairs: rows permuted per head (4 query heads, 2 key heads)
        expected["blk.1.attn_q.weight"] = permute_qk(expected["blk.1.attn_q.weight"], 4)
        expected["blk.1.attn_k.weight"] = permute_qk(expected["blk.1.attn_k.weight"], 2)
    else:
        expected["blk.0.attn_q.bias"] = state["model.layers.0.self_attn.q_proj.bias"]
    for name, want in expected.items():
        t = tensors[name]
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if want.ndim == 1 else gguf.GGMLQuantizationType.F16)
        np.testing.assert_array_equal(np.asarray(t.data, dtype=np.float32).reshape(want.shape), want, err_msg=name)


def test_permute_qk_pairs_the_two_halves_of_each_head():
    # One head of dim 4: HF rows (x0, x1 | y0, y1) rotate (x0, y0) and (x1, y1); llama.cpp wants them adjacent.
    rows = np.arange(8).reshape(8, 1)  # two heads
    assert permute_qk(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_q8_0_and_bf16_are_within_their_rounding(models):
    state = _hf_state(models["llama"])
    want = state["model.layers.0.mlp.up_proj.weight"]
    q8 = export_gguf(models["llama"], models["llama"] / "q8.gguf", "q8_0")
    bf = export_gguf(models["llama"], models["llama"] / "bf16.gguf", "bf16")
    for path, qtype in ((q8, gguf.GGMLQuantizationType.Q8_0), (bf, gguf.GGMLQuantizationType.BF16)):
        fields, tensors = _fields(path)
        t = tensors["blk.0.ffn_up.weight"]
        assert t.tensor_type == qtype
        got = gguf.quants.dequantize(t.data, qtype).reshape(want.shape)
        # Q8_0: 32-value blocks, w ≈ d·q with d = max|w|/127 stored as f16 and q an int8: half a step of
        # rounding, plus |q| ≤ 127 times d's own f16 rounding (2^-11 relative): 0.5 + 127/2048 < 0.57 steps.
        # BF16: 8 significant bits, so rounding to nearest is off by at most 2^-8 relative.
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            step = np.abs(want).reshape(-1, 32).max(1, keepdims=True) / 127
            bound = np.repeat(0.57 * step, 32, axis=1).reshape(want.shape)
        else:
            bound = np.abs(want) * 2.0**-8
        assert (np.abs(got - want) <= bound + 1e-7).all()
    assert _fields(q8)[0]["general.file_type"] == 7 and _fields(bf)[0]["general.file_type"] == 32


def _stagecraft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_cli_writes_beside_the_model_directory_never_into_it(models, tmp_path):
    from trainer.export.gguf import default_output

    assert default_output(tmp_path / "stages" / "sft" / "hf", "q8_0") == (tmp_path / "stages/sft/sft-q8_0.gguf").resolve()
    before = sorted(p.name for p in models["qwen2"].iterdir())
    proc = _stagecraft("export", str(models["qwen2"]), "--format", "gguf", "--outtype", "q8_0")
    assert proc.returncode == 0, proc.stderr
    out = models["qwen2"].with_name("qwen2-q8_0.gguf").resolve()
    assert proc.stdout.strip() == str(out) and _fields(out)[0]["general.file_type"] == 7
    assert sorted(p.name for p in models["qwen2"].iterdir()) == before


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])
def test_a_family_llama_cpp_cannot_take_is_refused_by_name(arch, tmp_path, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"n_embd": 32, "n_layer": 1, "n_head": 2} if arch == "gpt2" else \
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "pad_token_id": 0}
    AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=len(tokenizer), **kwargs)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    proc = _stagecraft("export", str(tmp_path), "--format", "gguf", "--outtype", "f16")
    assert proc.returncode == 2, proc.stderr
    assert f"model_type '{arch}' cannot be written as GGUF (supported: llama, mistral, qwen2)" in proc.stderr
    assert not list(tmp_path.glob("*.gguf"))


def test_q4_k_m_without_llama_cpp_is_refused_naming_it(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(BadInput, match=r"q4_k_m: needs llama.cpp's quantiser.*llama-cpp-python"):
        export_gguf(models["llama"], models["llama"] / "q4.gguf", "q4_k_m")


def test_byte_level_bpe_vocab_is_written_as_gpt2_with_merges(tmp_path):
    """A Llama-3 / Qwen2-style byte-level tokenizer: tokenizer.ggml.model gpt2, its merges, pre gpt-2."""
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(tk_models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["hello world, the quick brown fox"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    _tiny("llama", tmp_path, tok)
    fields, _ = _fields(export_gguf(tmp_path, tmp_path / "m.gguf"))
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert "tokenizer.ggml.scores" not in fields
    if _llama_cpp() is not None:
        llm = _llama_cpp().Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
        text = "hello world, the fox"
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text)["input_ids"]


# ---- llama.cpp itself ------------------------------------------------------------------------------

def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def _hf_greedy(model, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens by repeated full forwards (no KV cache, no EOS stop), and the prompt's logits."""
    ids = list(ids)
    with torch.no_grad():
        prompt_logits = model(torch.tensor([ids])).logits[0].numpy()
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids, prompt_logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_gives_transformers_greedy_tokens_and_logits(arch, models, f16_files, tokenizer):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the optional gguf-test extra")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32).eval()
    prompt = tokenizer(PROMPT)["input_ids"]
    want, want_logits = _hf_greedy(model, prompt, steps=8)

    llm = llama_cpp.Llama(model_path=str(f16_files[arch]), logits_all=True, vocab_only=False, n_ctx=64,
                          verbose=False)
    llm.eval(prompt)  # token ids fed directly: this compares the network, not the tokenizers
    got_logits = np.array(llm.scores[:len(prompt)])
    got = list(prompt)
    for _ in range(8):
        got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([got[-1]])
    assert got == want
    diff = np.abs(got_logits - want_logits)
    assert diff.max() < F16_MAX_TOL and diff.mean() < F16_MEAN_TOL, (diff.max(), diff.mean())
    assert len(set(want[len(prompt):])) > 1  # the continuation is not one repeated token

    # llama.cpp's own tokenizer (SentencePiece from the GGUF vocab) agrees with the HF one.
    for text, special in ((PROMPT, False), ("Sort: dcba swap pairs", False),
                          ("<|user|>\nCopy: xyz<|end|>\n<|assistant|>\n", True)):
        assert llm.tokenize(text.encode(), add_bos=False, special=special) == tokenizer(text)["input_ids"], text

    q8 = llama_cpp.Llama(model_path=str(export_gguf(models[arch], models[arch] / "q8.gguf", "q8_0")), logits_all=True,
                         n_ctx=64, verbose=False)
    q8.eval(prompt)
    assert np.abs(np.array(q8.scores[:len(prompt)]) - want_logits).max() < Q8_MAX_TOL


def test_q4_k_m_is_quantised_by_llama_cpp(models, f16_files):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the optional gguf-test extra")
    out = export_gguf(models["llama"], models["llama"] / "q4.gguf", "q4_k_m")
    fields, tensors = _fields(out)
    assert fields["general.file_type"] == 15
    # 64-wide rows do not fill a 256-value k-quant block, so llama.cpp falls back to legacy quants for
    # them; either way no matrix is left in f16.
    assert all(t.tensor_type not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)
               for t in tensors.values() if len(t.shape) == 2)
    assert out.stat().st_size < f16_files["llama"].stat().st_size / 2
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False)
    assert llm.n_vocab() == 400
