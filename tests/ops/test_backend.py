"""One backend object per device runs the layer pieces; the choice is explicit and checked."""

from __future__ import annotations

import pytest
import torch

from tessera.ops import backend as backends


def test_cpu_gets_the_cpu_kernels(monkeypatch):
    monkeypatch.delenv("TESSERA_ATTENTION_BACKEND", raising=False)
    assert backends.choose_backend(torch.device("cpu")).name == "cpu-kernels"


@pytest.mark.parametrize("name", backends.BACKENDS)
def test_a_backend_can_be_forced(monkeypatch, name):
    monkeypatch.setenv("TESSERA_ATTENTION_BACKEND", name)
    assert backends.choose_backend(torch.device("cpu")).name == name


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("TESSERA_ATTENTION_BACKEND", "flash9")
    with pytest.raises(ValueError, match="TESSERA_ATTENTION_BACKEND must be one of"):
        backends.choose_backend(torch.device("cpu"))


def test_cuda_without_triton_is_refused_at_start(monkeypatch):
    import tessera.ops.triton as triton_ops

    monkeypatch.delenv("TESSERA_ATTENTION_BACKEND", raising=False)
    monkeypatch.setattr(triton_ops, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="needs Triton"):
        backends.choose_backend(torch.device("cuda"))


def test_step_layout_offsets():
    layout = backends.StepLayout([[1], [2, 3], [4]], starts=[5, 0, 16], q_lens=[1, 20, 3], num_decode=1,
                                 block_size=16, null_block=0)
    assert layout.cu_seqlens == [0, 1, 21, 24]
    assert layout.seq_lens == [6, 20, 19]


def test_torch_backend_prefix_slots_follow_the_block_table():
    b = backends.TorchBackend(torch.device("cpu"))
    layout = backends.StepLayout([[7, 3, 9]], starts=[20], q_lens=[5], num_decode=0, block_size=16, null_block=0)
    meta = b.build_metadata(layout, torch.arange(5), torch.arange(20, 25))
    (chunk,) = meta.prefills
    assert chunk.seq_len == 25 and chunk.q_len == 5
    assert chunk.prefix_slots.tolist() == [7 * 16 + i for i in range(16)] + [3 * 16 + i for i in range(4)]


def test_host_lists_reach_the_device_with_their_values():
    from tessera.ops.backend import to_device

    t = to_device([[3, 1], [4, 1]], torch.int32, torch.device("cpu"))
    assert t.dtype == torch.int32 and t.tolist() == [[3, 1], [4, 1]]


@pytest.mark.gpu
def test_host_lists_reach_cuda_through_pinned_memory():
    from tessera.ops.backend import to_device

    t = to_device(list(range(1000)), torch.long, torch.device("cuda"))
    assert t.is_cuda and t.tolist() == list(range(1000))
