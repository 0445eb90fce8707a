"""`tessera bench offload`'s budgets: which weight memory each system of a run gets."""

from __future__ import annotations

from tessera.bench.offload import accelerate_budget


def test_a_given_weight_memory_is_every_systems_budget():
    kw = {"weight_memory": "1.5GB", "quantization": "bits:4"}
    assert accelerate_budget(kw, dense_budget=2_286_000_000, tessera_budget=1_500_000_000) == 1_500_000_000


def test_default_budgets_are_half_the_model_as_each_system_stores_it():
    # Quantized tessera keeps half its quantized model; Accelerate, streaming the bf16 checkpoint, half of that.
    half = 2_286_000_000
    assert accelerate_budget({"weight_memory": None, "quantization": "bits:4"}, half, 894_000_000) == half
    # Dense tessera: Accelerate gets the budget tessera ran under.
    assert accelerate_budget({"weight_memory": None, "quantization": None}, half, 2_180_000_000) == 2_180_000_000
