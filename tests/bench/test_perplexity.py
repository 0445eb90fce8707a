"""`tessera bench perplexity`: the figure equals HF transformers' perplexity on the same windows, and
8-bit weights stay close to it."""

from __future__ import annotations

import argparse
import math

import torch
from conftest import load_hf

from tessera.bench import add_bench_args
from tessera.bench.needle import essays_text
from tessera.bench.perplexity import bench_perplexity


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_args(p)
    return p.parse_args(["perplexity", *argv])


def test_perplexity_equals_hf_on_the_same_windows():
    from tessera.models.default_model import default_model_dir
    from tessera.tokenizer import load_tokenizer

    result = bench_perplexity(parse("--dtype", "float32", "--tokens", "300", "--window", "128"))
    assert result["windows"] == 3 and result["tokens_scored"] == 127 + 127 + 43
    path = default_model_dir(progress=False)
    ids = load_tokenizer(path).encode(essays_text(), add_special_tokens=False)[:300]
    hf = load_hf(path)
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, 300, 128):
            w = torch.tensor([ids[i:i + 128]])
            logp = hf(w).logits[0, :-1].float().log_softmax(-1)
            nll -= float(logp.gather(-1, w[0, 1:, None]).sum())
            n += w.shape[1] - 1
    assert abs(result["perplexity"] - math.exp(nll / n)) <= 1e-4 * math.exp(nll / n)


def test_eight_bit_weights_stay_close():
    full = bench_perplexity(parse("--dtype", "float32", "--tokens", "256", "--window", "128"))
    q8 = bench_perplexity(parse("--dtype", "float32", "--tokens", "256", "--window", "128",
                                "--quantization", "bits:8"))
    assert q8["linear_method"].startswith("bits:8") and q8["quantization"] == "bits:8"
    assert abs(q8["perplexity"] / full["perplexity"] - 1) < 0.02
