"""`tessera serve --instances 2`'s app: the OpenAI server (tessera/serve, unchanged) over a FleetRouter with
in-process instances. Streamed and whole completions equal a single engine's; /metrics sums the instances."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
from conftest import ThreadServer
from test_fleet import alone, engine_config, prompts  # noqa: F401 (fixtures)

from tessera.fleet.config import FleetConfig
from tessera.fleet.launch import start_router, stop_instances
from tessera.fleet.router import FleetCollector
from tessera.serve.app import build_app


def generated_tokens(metrics: str) -> float:
    return float(next(line.split()[-1] for line in metrics.splitlines()
                      if line.startswith("tessera:generation_tokens_total")))


def test_openai_server_on_a_fleet(model_dir, prompts, alone):  # noqa: F811
    router = asyncio.run(start_router(engine_config(model_dir), FleetConfig(2, "local", "accellm")))
    app = build_app(router, "tiny")
    app.state.server.metrics.registry.register(FleetCollector(router, "tiny"))
    # the tiny model has no tokenizer: logprobs name each token as token_id:N
    body = {"model": "tiny", "max_tokens": 20, "temperature": 0, "ignore_eos": True, "logprobs": 0}

    def ids(logprobs: dict) -> list[int]:
        return [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]

    try:
        with ThreadServer(app) as url, httpx.Client(base_url=url, timeout=120) as http:
            assert http.get("/health").status_code == 200
            whole = [http.post("/v1/completions", json={**body, "prompt": p}).json() for p in prompts[1:4]]
            streamed = []
            with http.stream("POST", "/v1/completions", json={**body, "prompt": prompts[4], "stream": True}) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            streamed = [t for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                        for t in ids(c["choices"][0]["logprobs"])]
            deadline = time.monotonic() + 10
            while True:  # the instances' snapshots reach the router with their next poll
                metrics = http.get("/metrics").text
                if generated_tokens(metrics) >= 4 * 20 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            bad = http.post("/v1/completions", json={**body, "prompt": [10**6]})
        assert [ids(w["choices"][0]["logprobs"]) for w in whole] == alone[1:4]  # (alone[0] is a longer request)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # (no text, so one chunk: no tokenizer)
        assert streamed == alone[4]
        assert 'tessera:kv_cache_blocks_total{model_name="tiny"}' in metrics
        total = float(next(line.split()[-1] for line in metrics.splitlines()
                           if line.startswith("tessera:kv_cache_blocks_total")))
        assert total == 2 * router.engine.block_manager.num_blocks  # both instances' pools
        assert generated_tokens(metrics) >= 4 * 20  # every instance's tokens (4 requests of 20 tokens)
        steps = {re.search(r'instance="(\d+)"', line)[1]: float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("tessera:fleet_engine_steps_total{")}
        # One series per instance. Which member runs the steps is the policy's choice and depends on timing:
        # a decode moves to the partner only once the partner holds the KV copy, so under load (the full suite
        # on 2 cores) one member may run all four requests; the series must still be there for both.
        assert set(steps) == {"0", "1"} and sum(steps.values()) > 0
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    finally:
        stop_instances(router.handles)
