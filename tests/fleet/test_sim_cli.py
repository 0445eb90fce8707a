"""`tessera sim` from the command line: a run per (size, policy) and the comparison with measured JSON."""

from __future__ import annotations

import json

import pytest

from tessera.cli import main


def test_sim_command_runs_and_compares(tmp_path, capsys):
    out = tmp_path / "sim.json"
    args = ["sim", "--cost-preset", "h100-llama2-70b", "--tp", "4", "--instances", "2", "3", "--routing",
            "least-loaded", "accellm", "--num-requests", "30", "--request-rate", "20", "--max-prompt-tokens", "512",
            "--max-output-tokens", "16", "--num-blocks", "1024"]
    assert main([*args, "--json-out", str(out)]) == 0
    data = json.loads(out.read_text())
    runs = [(r["summary"]["policy"], r["summary"]["num_instances"]) for r in data["runs"]]
    assert runs == [("least-loaded", 2), ("accellm", 2), ("least-loaded", 3)]  # accellm needs an even count
    assert all(r["summary"]["completed"] == 30 for r in data["runs"])
    assert data["cost_model"]["tp"] == 4 and data["trace"]["num_requests"] == 30
    # The runs as "measured" files: each simulated run is compared with the one of its policy and size.
    real = tmp_path / "real.json"
    real.write_text(json.dumps([data["runs"][0], data["runs"][2]]))
    capsys.readouterr()
    assert main([*args, "--compare", str(real), "--repeats", "2"]) == 0
    io = capsys.readouterr()
    again = json.loads(io.out)
    errs = [r.get("vs_real") for r in again["runs"]]
    assert errs[1] is None and all(v == pytest.approx(0.0) for v in errs[0].values())
    assert all(v == pytest.approx(0.0) for v in errs[2].values())
    assert again["repeats"] == 2 and "within 15%: 12 of 12 figures" in io.err  # the table on stderr
    # The same command run several times: each figure is compared with its median over the runs.
    files = []
    for k, scale in enumerate((0.5, 1.0, 10.0)):
        runs = json.loads(real.read_text())
        for r in runs:
            for m in ("ttft", "tbt", "e2e"):
                r["summary"][m] = {q: v * scale for q, v in r["summary"][m].items()}
        files.append(tmp_path / f"rep{k}.json")
        files[-1].write_text(json.dumps(runs))
    capsys.readouterr()
    assert main([*args, "--compare", *map(str, files)]) == 0
    io = capsys.readouterr()
    again = json.loads(io.out)["runs"]
    assert again[0]["compared_runs"] == 3 and all(v == pytest.approx(0.0) for v in again[0]["vs_real"].values())
    assert "least-loaded x2 (3 runs)" in io.err and "within 15%: 12 of 12 figures" in io.err
    assert main([*args, "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err


def test_sim_command_needs_a_cost_model(capsys):
    assert main(["sim", "--instances", "2"]) == 2
    assert "--cost FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sim", "--cost-preset", "h100-llama2-70b", "--kill", "oops"])
    assert "ID@SECONDS" in capsys.readouterr().err
