"""`tessera sim fit`: time real engine steps on this machine and fit the simulator's step cost.

The engine (the default model unless --model says otherwise) runs a fixed grid of batches: every
(batch size, prompt length) pair, each request generating a few tokens, so the steps cover pure prefills
(chunked at max_num_batched_tokens), pure decodes at several batch sizes and contexts, and mixes of
both. Each step's shape is read off the scheduler's plan and its wall time is the whole `LLMEngine.step`
(scheduling, the model, sampling: what the fleet's instances spend per step). Run it under the exclusive
machine lock: the timings are the measurement.
"""

from __future__ import annotations

import argparse
import logging
import random
import time

from tessera.errors import InvalidRequestError
from tessera.fleet.cost_model import LinearCost, StepShape

log = logging.getLogger(__name__)

DEFAULT_BATCHES = (1, 4, 16)
DEFAULT_PROMPTS = (16, 128, 512)


class PlanWatcher:
    """Notes the shape of every plan an engine's scheduler makes (`shapes`, the latest last), so a timed
    `LLMEngine.step` can be paired with what it computed. `close()` puts the scheduler back."""

    def __init__(self, engine):
        self.scheduler = engine.scheduler
        self.shapes: list[StepShape] = []
        schedule = self._schedule = self.scheduler.schedule

        def capture():
            plan = schedule()
            self.shapes.append(StepShape.of_plan(plan.scheduled))
            return plan

        self.scheduler.schedule = capture

    def close(self) -> None:
        self.scheduler.schedule = self._schedule


def fit_runs(paths: list[str], **kw) -> LinearCost:
    """A step cost fitted from the steps a real fleet timed (`tessera bench fleet --out-dir`: each
    instance's `step_samples`), so what the instances paid while sharing the machine is in the cost."""
    import json
    from pathlib import Path

    samples, kv_block, block_size = [], 0, 16
    for path in paths:
        data = json.loads(Path(path).read_text())
        block_size = data.get("config", {}).get("engine", {}).get("block_size", block_size)
        for inst in data.get("instance_records", []):
            kv_block = inst.get("kv_bytes_per_block") or kv_block
            samples += [(StepShape(*map(int, row[:4])), row[4]) for row in inst.get("step_samples", [])]
    if not samples:
        raise InvalidRequestError(f"no step samples in {paths} (FleetResult files of `tessera bench fleet --out-dir`)")
    return LinearCost.fit(samples, kv_bytes_per_token=kv_block // block_size, **kw)


def time_steps(engine, batches=DEFAULT_BATCHES, prompts=DEFAULT_PROMPTS, output_tokens: int = 12,
               seed: int = 0) -> list[tuple[StepShape, float]]:
    """Run the grid on `engine` (an LLMEngine); returns (shape, seconds) of every step after the warm-up."""
    from tessera.sampling_params import SamplingParams

    watcher = PlanWatcher(engine)
    planned = watcher.shapes
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    samples: list[tuple[StepShape, float]] = []
    try:
        for round_, grid in enumerate(((1,), batches)):  # round 0 warms up: kernels built, caches touched
            for bs in grid:
                for plen in prompts:
                    for _ in range(bs):
                        engine.add_request([rng.randrange(10, vocab) for _ in range(plen)], params)
                    while engine.has_unfinished_requests():
                        t0 = time.perf_counter()
                        engine.step()
                        dt = time.perf_counter() - t0
                        if round_ and planned and planned[-1].prefill_tokens + planned[-1].decode_seqs:
                            samples.append((planned[-1], dt))
                        planned.clear()
                    engine.block_manager.reset_prefix_cache()
            log.info("sim fit: round %d done, %d steps timed", round_, len(samples))
    finally:
        watcher.close()
    return samples


def fit_engine(args: argparse.Namespace) -> dict:
    from tessera.config import EngineConfig, engine_kwargs
    from tessera.cpu_features import describe
    from tessera.engine.llm_engine import LLMEngine
    from tessera.engine.model_runner import ModelRunner

    if args.solo_cost and not args.from_runs:
        raise InvalidRequestError("--solo-cost goes with --from-runs (the fleet runs whose contention is fitted)")
    if args.from_runs:  # the steps a real fleet timed: no engine here
        if args.solo_cost:  # the shape's cost from one engine alone, the sharing from the fleet
            from tessera.fleet.contention import fit_contention
            from tessera.fleet.cost_model import load_cost_model

            cost = fit_contention(args.from_runs, load_cost_model(args.solo_cost), args.contention_form)
        else:
            from tessera.config import ModelConfig
            from tessera.models.loader import resolve_model_path

            layers = ModelConfig.from_dir(resolve_model_path(EngineConfig(**engine_kwargs(args)).model)).num_layers
            cost = fit_runs(args.from_runs, num_layers=layers, link_bandwidth=args.link_bandwidth,
                            link_latency=args.link_latency,
                            description=f"fitted {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the "
                                        f"steps of {len(args.from_runs)} real fleet run(s)")
        if args.output:
            cost.save(args.output)
        return {"cost_model": cost.to_json(), "output": args.output, "from_runs": args.from_runs}
    engine = LLMEngine(EngineConfig(**engine_kwargs(args)), progress=False)
    samples = time_steps(engine, tuple(args.batches), tuple(args.prompts), args.output_tokens)
    cfg = engine.model_config
    kv_block = ModelRunner.kv_bytes_per_block(cfg, engine.config.block_size, engine.dtype)
    cost = LinearCost.fit(samples, kv_bytes_per_token=kv_block // engine.config.block_size,
                          num_layers=cfg.num_layers, link_bandwidth=args.link_bandwidth,
                          link_latency=args.link_latency,
                          description=f"{engine.model_path.name} {str(engine.dtype).removeprefix('torch.')}, "
                                      f"{engine.config.num_threads or 'torch default'} thread(s), fitted "
                                      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.output:
        cost.save(args.output)
    info = describe()
    return {"cost_model": cost.to_json(), "output": args.output,
            "machine": info,
            "steps": [{"shape": s.__dict__, "seconds": t} for s, t in samples] if args.show_steps else len(samples)}
