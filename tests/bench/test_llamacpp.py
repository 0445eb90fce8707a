"""`tessera bench latency --compare llama.cpp`: the runner speaks the protocol (checked against a stand-in
llama_cpp module), never imports tessera, and a missing venv or a non-GGUF model fails before loading."""

from __future__ import annotations

import ast
import json
import sys

import pytest

from tessera.bench import llamacpp
from tessera.bench.compare import ExternalEngineMissing
from tessera.cli import main

FAKE = '''
__version__ = "fake"
class Llama:
    def __init__(self, model_path, n_ctx, n_threads, n_threads_batch, n_batch, seed, verbose, n_ubatch,
                 logits_all):
        self.ctx, self.evals, self.logits_all = n_ctx, [], logits_all
    def n_ctx(self):
        return self.ctx
    def reset(self):
        self.evals.append("reset")
    def eval(self, tokens):
        self.evals.append(list(tokens))
        self.n = len(tokens)
    @property
    def scores(self):  # every position's logits (logits_all), a function of the window's length here
        import numpy as np
        assert self.logits_all
        return np.random.default_rng(self.n).standard_normal((self.ctx, 11)).astype(np.float32)
    def sample(self, top_k, temp):
        assert top_k == 1 and temp == 0.0
        return 7
'''


def test_runner_protocol_with_a_stand_in_llama_cpp(tmp_path, monkeypatch):
    (tmp_path / "llama_cpp.py").write_text(FAKE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    workload = {"mode": "latency", "model": "m.gguf", "prompt": [1, 2, 3], "output_len": 5, "n_threads": 2}
    from tessera.bench.compare import ExternalRunner

    with ExternalRunner(sys.executable, workload, script=llamacpp.RUNNER) as runner:
        assert runner.info["engine"]["n_threads"] == 2
        for k in range(2):
            r = runner.run_round()
            assert r["round"] == k and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
    assert runner.proc.returncode == 0
    json.dumps(r)


def test_perplexity_protocol_scores_every_token_after_the_first(tmp_path, monkeypatch):
    import numpy as np
    import torch

    (tmp_path / "llama_cpp.py").write_text(FAKE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    windows = [[1, 2, 3, 4], [5, 6]]
    workload = {"mode": "perplexity", "model": "m.gguf", "windows": windows, "n_threads": 1, "n_ctx": 16}
    from tessera.bench.compare import ExternalRunner

    with ExternalRunner(sys.executable, workload, script=llamacpp.RUNNER) as runner:
        r = runner.run_round()
    want = 0.0
    for ids in windows:
        logits = torch.from_numpy(np.random.default_rng(len(ids)).standard_normal((16, 11)).astype(np.float32))
        logp = torch.log_softmax(logits.double(), -1)
        want -= sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    assert r["scored"] == 4 and r["nll"] == pytest.approx(want, rel=1e-9)


def test_runner_never_imports_tessera():
    tree = ast.parse(llamacpp.RUNNER.read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert "llama_cpp" in names and not [m for m in names if m.split(".")[0] == "tessera"]


def test_missing_venv_and_non_gguf_models_fail_first(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(llamacpp.LLAMACPP_PYTHON_ENV, raising=False)
    monkeypatch.setattr(llamacpp, "DEFAULT_LLAMACPP_VENV", tmp_path / ".venv-llamacpp")
    with pytest.raises(ExternalEngineMissing, match="make llamacpp-venv"):
        llamacpp.find_llamacpp_python()
    with pytest.raises(ExternalEngineMissing, match="needs a .gguf"):
        llamacpp.gguf_for(str(tmp_path))
    assert llamacpp.gguf_for(None).suffix == ".gguf"  # the default model's own file
    code = main(["bench", "latency", "--compare", "llama.cpp", "--llamacpp-python", str(tmp_path / "none")])
    assert code == 2 and "make llamacpp-venv" in capsys.readouterr().err
