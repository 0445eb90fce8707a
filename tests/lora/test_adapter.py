"""Reading and checking PEFT adapters: every refusal names its problem, before any work starts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tessera import LLM, LoRARequest, ModelLoadError, SamplingParams, UnsupportedModelError
from tessera.config import ModelConfig
from tessera.lora.adapter import load_adapter

GREEDY = SamplingParams(temperature=0, max_tokens=2)


def edited(src, dst, **fields):
    shutil.copytree(src, dst)
    conf = json.loads((dst / "adapter_config.json").read_text())
    conf.update(fields)
    (dst / "adapter_config.json").write_text(json.dumps(conf))
    return dst


def test_weights_and_scaling(model_dir, lora_dir):
    cfg = ModelConfig.from_dir(model_dir("llama"))
    plain = load_adapter("a", lora_dir("llama", seed=1, r=4, alpha=8.0), cfg, 16)
    rs = load_adapter("b", lora_dir("llama", seed=1, r=4, alpha=8.0, use_rslora=True), cfg, 16)
    assert plain.rank == 4 and len(plain.weights) == cfg.num_layers * 7
    a, b = plain.weights[(0, "k_proj")]
    assert a.shape == (4, cfg.hidden_size) and b.shape == (cfg.kv_size, 4)
    # alpha / r = 2 against alpha / sqrt(r) = 4: same files but for the flag, so B differs by 2x.
    torch.testing.assert_close(rs.weights[(0, "k_proj")][1], 2 * b)


def test_rank_above_max_lora_rank(model_dir, lora_dir):
    llm = LLM(str(model_dir("llama")), progress=False, enable_lora=True, max_lora_rank=4)
    with pytest.raises(UnsupportedModelError, match="rank 8 .* exceeds max_lora_rank 4"):
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False, lora_request=LoRARequest("big", 1, str(lora_dir(r=8))))
    assert not llm.engine.requests


def test_adapter_of_another_base_model(model_dir, lora_dir):
    llm = LLM(str(model_dir("llama")), progress=False, enable_lora=True)
    other = lora_dir("qwen2", seed=1)  # hidden size 96 against llama's 64
    with pytest.raises(ModelLoadError, match=r"maps 160 -> 96 features but the base model's down_proj maps 160 -> "
                                              r"64 \(hidden size 64\): the adapter was trained for another base"):
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False, lora_request=LoRARequest("q", 1, str(other)))


@pytest.mark.parametrize("fields,match", [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias='all'"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, r"target modules \['embed_tokens'\]"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"alpha_pattern": {"q_proj": 3}}, "alpha_pattern"),
])
def test_unsupported_features_are_refused(model_dir, lora_dir, tmp_path, fields, match):
    cfg = ModelConfig.from_dir(model_dir("llama"))
    with pytest.raises(UnsupportedModelError, match=match):
        load_adapter("x", edited(lora_dir(), tmp_path / "x", **fields), cfg, 16)


def test_missing_and_corrupt_files(model_dir, lora_dir, tmp_path):
    cfg = ModelConfig.from_dir(model_dir("llama"))
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_adapter("x", tmp_path / "nope", cfg, 16)
    d = edited(lora_dir(), tmp_path / "d")
    (d / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="cannot read its weights"):
        load_adapter("x", d, cfg, 16)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no adapter_model.safetensors"):
        load_adapter("x", d, cfg, 16)
    (d / "adapter_config.json").unlink()
    with pytest.raises(ModelLoadError, match="no adapter_config.json"):
        load_adapter("x", d, cfg, 16)
