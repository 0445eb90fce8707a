"""ops/csrc/sampling.cpp: one token per row from softmax(logits / temperature) by inverse CDF, the same token
as the sampler's torch path (divide, max, exp, cumsum, searchsorted) for every row."""

import torch

from tessera import SamplingParams
from tessera.engine.sampler import Sampler
from tessera.engine.sequence import Sequence


def torch_path(logits: torch.Tensor, temps: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The sampler's torch path for unfiltered rows (Sampler.__call__ and Sampler._draw)."""
    sub = logits / temps[:, None]
    probs = (sub - sub.amax(dim=-1, keepdim=True)).exp_()
    cdf = probs.cumsum(dim=-1)
    picked = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)
    ok = probs.gather(-1, picked) > 0
    return torch.where(ok, picked, probs.argmax(dim=-1, keepdim=True)).squeeze(-1)


def test_sample_rows_equals_the_torch_path(kernels):
    """Vocabularies that are and are not multiples of the vector width and of the 64-weight blocks, masked
    tokens (-inf), temperatures from 0.05 to 2, and uniform numbers at 0, near 1 and in between: the same
    token in every row (one wrong block or rounding would move some of the 4,000 draws)."""
    g = torch.Generator().manual_seed(7)
    for vocab in (1, 5, 64, 1000, 49152, 50257):
        rows = 4000 if vocab <= 1000 else 200
        logits = torch.randn(rows, vocab, generator=g) * 4
        logits[torch.rand(rows, vocab, generator=g) < 0.3] = float("-inf")
        logits[:, 0] = torch.randn(rows, generator=g)  # a finite logit in every row
        temps = torch.empty(rows).uniform_(0.05, 2.0, generator=g)
        uniform = torch.rand(rows, generator=g)
        uniform[:3] = torch.tensor([0.0, 1.0 - 2 ** -24, 0.5])
        out = torch.empty(rows, dtype=torch.long)
        kernels.sample_rows(out, logits, temps, uniform)
        want = torch_path(logits, temps, uniform)
        assert torch.equal(out, want), (vocab, int((out != want).sum()))
        assert not torch.isinf(logits.gather(1, out[:, None])).any()  # a masked token is never drawn
    strided = torch.randn(8, 300, generator=g)[:, :257]  # rows further apart than the vocabulary
    temps, uniform, out = torch.full((8,), 0.7), torch.rand(8, generator=g), torch.empty(8, dtype=torch.long)
    kernels.sample_rows(out, strided, temps, uniform)
    assert torch.equal(out, torch_path(strided, temps, uniform))


def test_the_sampler_takes_the_kernel_for_unfiltered_rows_and_torch_for_filtered(kernels, monkeypatch):
    """Sampler: unfiltered random rows go to sample_rows (its tokens, in the rows' places among greedy rows);
    rows with top-k / top-p / min-p keep the torch path; both consume the same uniform numbers."""
    calls = []
    real = kernels.sample_rows

    class Spy:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def sample_rows(self, *args):
            calls.append(args[1].shape)
            return real(*args)

    monkeypatch.setattr("tessera.engine.sampler._cpu_sampling_kernels", lambda logits: Spy())
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 500, generator=g)
    greedy, warm = SamplingParams(temperature=0), SamplingParams(temperature=0.8)
    seqs = [Sequence(i, "r", 0, [1], p) for i, p in enumerate([greedy, warm, warm, greedy, warm, greedy])]
    got = Sampler(seed=5)(logits.clone(), seqs).token_ids
    assert calls == [(3, 500)]
    uniform = torch.empty(3, 1).uniform_(generator=torch.Generator().manual_seed(5)).view(-1)
    want = torch_path(logits[[1, 2, 4]], torch.full((3,), 0.8), uniform)
    assert [got[i] for i in (1, 2, 4)] == want.tolist()
    assert [got[i] for i in (0, 3, 5)] == logits[[0, 3, 5]].argmax(-1).tolist()
    calls.clear()
    Sampler(seed=5)(logits.clone(), [Sequence(0, "r", 0, [1], SamplingParams(temperature=0.8, top_k=5))])
    assert calls == []
