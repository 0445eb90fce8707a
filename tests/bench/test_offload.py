"""`tessera bench offload`'s budgets: which weight memory each system of a run gets."""

from __future__ import annotations

from tessera.bench.offload import accelerate_budget, dense_pass
from tessera.config import EngineConfig


def test_a_given_weight_memory_is_every_systems_budget():
    kw = {"weight_memory": "1.5GB", "quantization": "bits:4"}
    assert accelerate_budget(kw, dense_budget=2_286_000_000, tessera_budget=1_500_000_000) == 1_500_000_000


def test_default_budgets_are_half_the_model_as_each_system_stores_it():
    # Quantized tessera keeps half its quantized model; Accelerate, streaming the bf16 checkpoint, half of that.
    half = 2_286_000_000
    assert accelerate_budget({"weight_memory": None, "quantization": "bits:4"}, half, 894_000_000) == half
    # Dense tessera: Accelerate gets the budget tessera ran under.
    assert accelerate_budget({"weight_memory": None, "quantization": None}, half, 2_180_000_000) == 2_180_000_000


def test_the_dense_pass_drops_every_quantization_setting():
    """--dense-too beside --quantize-lm-head / --activation-bits: the dense engine must not inherit them
    (EngineConfig refuses a quantized LM head without a quantization)."""
    kw = {"model": None, "quantization": "bits:4", "quantize_lm_head": True, "activation_bits": 8,
          "weight_memory": None}
    dense = dense_pass(kw, dense_budget=2_286_000_000)
    assert dense["quantization"] is None and not dense["quantize_lm_head"] and dense["activation_bits"] is None
    assert dense["weight_memory"] == 2_286_000_000
    EngineConfig(**dense)  # validates
    assert dense_pass({**kw, "weight_memory": "1.5GB"}, 2_286_000_000)["weight_memory"] == "1.5GB"
