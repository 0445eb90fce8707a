"""The quantized checkpoint (tessera.quant.checkpoint, written by tessera.quant.convert / `tessera quantize`):
it loads without quantizing again, gives what quantizing at load gives, and refuses what it cannot be."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tessera.quant.bits_linear as bits_linear
from tessera import LLM, SamplingParams
from tessera.cli import main
from tessera.errors import InvalidRequestError, ModelLoadError
from tessera.models.shard_writer import INDEX_FILE, ShardWriter
from tessera.quant.bits_linear import canonical
from tessera.quant.checkpoint import LAYOUT_FILE, read_layout
from tessera.quant.convert import quantize_checkpoint
from tessera.quant.quantize import QuantSpec

PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[5, 17, 99, 3], [200, 1, 45, 67, 89, 11, 23]]


def quantized_layers(llm):
    return {n: m for n, m in llm.engine.model.named_modules() if getattr(m, "qweight", None) is not None}


def tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


@pytest.mark.parametrize("arch,quant,method,lm_head", [("llama", "bits:4", "rtn", False),
                                                       ("llama_mqa_tied", "bits:3", "hqq", True),
                                                       ("qwen2", "bits:5", "rtn", True)])
def test_saved_checkpoint_equals_quantizing_at_load(model_dir, tmp_path, monkeypatch, arch, quant, method, lm_head):
    src = model_dir(arch)
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(src), "--output", str(out), "--quantization", quant,
            "--quantization-group-size", "32", "--quantization-method", method]
    assert main(argv + (["--quantize-lm-head"] if lm_head else [])) == 0
    layout = read_layout(out)
    assert layout.quantization == quant and layout.method == method and layout.lm_head == lm_head
    at_load = LLM(str(src), dtype="float32", quantization=quant, quantization_group_size=32,
                  quantization_method=method, quantize_lm_head=lm_head, progress=False)

    def no_requantizing(*a, **k):
        raise AssertionError("a quantized checkpoint must load without quantizing")

    monkeypatch.setattr(bits_linear, "quantize_weight", no_requantizing)
    saved = LLM(str(out), dtype="float32", progress=False)
    want, got = quantized_layers(at_load), quantized_layers(saved)
    assert sorted(got) == sorted(want) and ("lm_head" in got) == lm_head
    for name, layer in got.items():
        a, b = canonical(layer), canonical(want[name])
        assert a.bits == b.bits and torch.equal(a.planes, b.planes), name
        assert torch.equal(a.scale, b.scale) and torch.equal(a.offset, b.offset), name
    assert tokens(saved) == tokens(at_load)
    # The embeddings stay dense (a lookup), tied or not.
    assert saved.engine.model.embed_tokens.weight.numel() == saved.engine.model_config.vocab_size * \
        saved.engine.model_config.hidden_size


def test_checkpoint_refuses_another_quantization(model_dir, tmp_path):
    out = quantize_checkpoint(model_dir("llama"), tmp_path / "q", QuantSpec(4, 64, "rtn"), progress=False)
    with pytest.raises(InvalidRequestError, match="is a quantized checkpoint .*bits:4"):
        LLM(str(out), quantization="bits:8", progress=False)
    with pytest.raises(InvalidRequestError, match="without its LM head"):
        LLM(str(out), quantization="bits:4", quantize_lm_head=True, progress=False)


def test_broken_checkpoints_are_named(model_dir, tmp_path):
    out = quantize_checkpoint(model_dir("llama"), tmp_path / "q", QuantSpec(4, 64, "rtn"), progress=False)
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    del tensors["layers.1.mlp.down_proj.qweight.scale"]
    save_file(tensors, str(weights))
    with pytest.raises(ModelLoadError, match="missing weights.*layers.1.mlp.down_proj"):
        LLM(str(out), progress=False)
    (out / LAYOUT_FILE).write_text("{not json")
    with pytest.raises(ModelLoadError, match="not a valid tessera quantized-checkpoint layout"):
        LLM(str(out), progress=False)
    (out / LAYOUT_FILE).write_text(json.dumps({"format": "tessera-bitplanes", "version": 99}))
    with pytest.raises(ModelLoadError, match="version 99"):
        LLM(str(out), progress=False)


def test_conversion_streams_a_layer_at_a_time(model_dir, tmp_path, monkeypatch):
    """With small shards, layer i is on disk before layer i + 1 is read: the converter never holds the
    model (a model larger than memory converts). The sharded result loads like a single file."""
    import tessera.quant.convert as convert

    events = []
    real_dense, real_flush = convert._SafetensorsSource.dense, ShardWriter.flush
    monkeypatch.setattr(convert._SafetensorsSource, "dense",
                        lambda self, name: events.append(("read", name)) or real_dense(self, name))
    monkeypatch.setattr(ShardWriter, "flush", lambda self: events.append(("write", list(self.pending))) or
                        real_flush(self))
    monkeypatch.setattr(convert, "ShardWriter", lambda out, max_shard_bytes: ShardWriter(out, 1))
    src = model_dir("llama")
    out = quantize_checkpoint(src, tmp_path / "q", QuantSpec(4, 64, "rtn"), progress=False)
    assert (out / INDEX_FILE).is_file()
    first_read_of_layer1 = next(i for i, (kind, x) in enumerate(events) if kind == "read" and ".layers.1." in x)
    written_before = [n for kind, names in events[:first_read_of_layer1] if kind == "write" for n in names]
    assert {"layers.0.self_attn.qkv_proj.qweight.planes", "layers.0.mlp.down_proj.qweight.planes"} <= \
        set(written_before)
    monkeypatch.undo()
    reference = LLM(str(src), dtype="float32", quantization="bits:4", progress=False)
    assert tokens(LLM(str(out), dtype="float32", progress=False)) == tokens(reference)
