"""`tessera run`: an offline JSONL batch. One output line per input line, in input order; a bad line
becomes an error record for that line and the rest completes. Inputs are read lazily and only a
window of requests is in flight, so memory stays flat however long the file is.

With prefix planning on, the window is read in chunks and each chunk is planned as a whole (shared
prefixes computed once, decode-heavy requests first): a new chunk is read when half the window has
finished, so the engine never drains between chunks. Planning the whole file at once would need every
prompt in memory; prefixes shared across chunks are still found by the prefix cache, and `--window`
widens the horizon of the plan."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import fields
from pathlib import Path

from tqdm.auto import tqdm

from tessera.engine.prefix_planner import PlannedAdmission, add_planned
from tessera.errors import InvalidRequestError, TesseraError
from tessera.outputs import CompletionOutput, RequestOutput
from tessera.sampling_params import SamplingParams
from tessera.tokenizer import apply_chat_template

_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams) if f.init}


def parse_line(line: str, defaults: dict, tokenizer,
               keep_messages: bool = False) -> tuple[str | list[int] | list[dict], SamplingParams, object]:
    """-> (prompt or token ids, params, the line's id). Raises InvalidRequestError naming the problem.
    With keep_messages, a chat line's prompt is its message list (not yet templated)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"line is not valid JSON: {e}") from e
    if isinstance(rec, str):
        rec = {"prompt": rec}
    if not isinstance(rec, dict):
        raise InvalidRequestError("line must be a JSON object or a string")
    keys = [k for k in ("prompt", "messages", "prompt_token_ids") if k in rec]
    if len(keys) != 1:
        raise InvalidRequestError("line must have exactly one of 'prompt', 'messages', 'prompt_token_ids'")
    unknown = set(rec) - _SAMPLING_FIELDS - {"prompt", "messages", "prompt_token_ids", "id"}
    if unknown:
        raise InvalidRequestError(f"unknown field(s) {sorted(unknown)}")
    sp = {**defaults, **{k: v for k, v in rec.items() if k in _SAMPLING_FIELDS}}
    try:
        params = SamplingParams(**sp)
    except TypeError as e:
        raise InvalidRequestError(str(e)) from e
    if "messages" in rec and keep_messages:
        prompt = rec["messages"]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
            raise InvalidRequestError("'messages' must be a non-empty list of message objects")
    elif "messages" in rec:
        prompt = apply_chat_template(tokenizer, rec["messages"])
    elif "prompt" in rec:
        prompt = rec["prompt"]
        if not isinstance(prompt, str):
            raise InvalidRequestError("'prompt' must be a string")
    else:
        prompt = rec["prompt_token_ids"]
        if not isinstance(prompt, list):
            raise InvalidRequestError("'prompt_token_ids' must be a list of integers")
    return prompt, params, rec.get("id")


def _number(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no infinities


def completion_record(c: CompletionOutput) -> dict:
    """One completion as an output line holds it. With `logprobs` asked for: per generated token, the
    top-N tokens and the chosen one as {"token_id", "logprob", "rank"}, most likely first, and the
    completion's cumulative_logprob."""
    rec = {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
    if c.logprobs is not None:
        rec["logprobs"] = [_logprob_entry(entry) for entry in c.logprobs]
        rec["cumulative_logprob"] = _number(c.cumulative_logprob)
    return rec


def _logprob_entry(entry: dict) -> list[dict]:
    return [{"token_id": t, "logprob": _number(lp.logprob), "rank": lp.rank}
            for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank)]


def output_record(out: RequestOutput) -> dict:
    """A finished request's fields in its output line: its completion's (under `outputs` when n > 1)
    and, with `prompt_logprobs` asked for, per prompt token the same entries as `logprobs` (null for
    the first token, which nothing predicts)."""
    comps = [completion_record(c) for c in out.outputs]
    rec = comps[0] if len(comps) == 1 else {"outputs": comps}
    if out.prompt_logprobs is not None:
        rec["prompt_logprobs"] = [None if e is None else _logprob_entry(e) for e in out.prompt_logprobs]
    return rec


def run_jsonl(args: argparse.Namespace) -> int:
    from tessera.config import engine_kwargs
    from tessera.llm import LLM
    from tessera.longctx.config import long_context_config

    llm = LLM(**engine_kwargs(args))
    defaults = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature))
                if v is not None}
    window = args.window or 4 * llm.config.max_num_seqs
    long_context = long_context_config(args)
    if long_context is not None:
        stats = run_file_long_context(llm, Path(args.input), Path(args.output), defaults, window, long_context)
    else:
        stats = run_file(llm, Path(args.input), Path(args.output), defaults, window)
    print(json.dumps(stats))
    return 0


def run_file(llm, input_path: Path, output_path: Path, defaults: dict, window: int,
             progress: bool = True) -> dict:
    engine = llm.engine
    planned = llm.plans_batches
    sched = engine.scheduler
    fcfs = sched.policy
    if planned:
        sched.policy = PlannedAdmission()
    hits0, queries0 = engine.block_manager.prefix_hits, engine.block_manager.prefix_queries
    try:
        return _run_file(llm, input_path, output_path, defaults, window, progress, planned, hits0, queries0)
    finally:
        sched.policy = fcfs


def _run_file(llm, input_path: Path, output_path: Path, defaults: dict, window: int, progress: bool,
              planned: bool, hits0: int, queries0: int) -> dict:
    engine = llm.engine
    total_lines = sum(1 for _ in input_path.open())
    done: dict[int, dict] = {}  # finished records waiting for their turn to be written
    in_flight: dict[str, int] = {}  # request id -> line number
    line_ids: dict[str, dict] = {}  # request id -> the line's own "id", echoed back
    next_to_write = 0
    errors = out_tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total_lines, desc="requests", unit="req", disable=not progress, dynamic_ncols=True)
    with input_path.open() as fin, output_path.open("w") as fout:
        lines = enumerate(fin)
        exhausted = False

        def flush() -> None:
            nonlocal next_to_write
            while next_to_write in done:
                fout.write(json.dumps(done.pop(next_to_write)) + "\n")
                next_to_write += 1

        def error(lineno: int, msg: str) -> None:
            nonlocal errors
            done[lineno] = {"index": lineno, "error": msg}
            errors += 1
            bar.update(1)

        def read_chunk(limit: int) -> None:
            """Validate up to `limit` more lines and add them: as one planned batch when planning is on."""
            nonlocal exhausted
            items, linenos = [], []
            for _ in range(limit):
                nxt = next(lines, None)
                if nxt is None:
                    exhausted = True
                    break
                lineno, line = nxt
                if not line.strip():
                    error(lineno, "empty line")
                    continue
                try:
                    prompt, params, rid = parse_line(line, defaults, engine.tokenizer)
                    params.validate()
                    text, ids = engine.encode_prompt(prompt)
                    engine.check_request(ids, params)
                except TesseraError as e:
                    error(lineno, str(e))
                    continue
                items.append((text, ids, params, f"line-{lineno}"))
                linenos.append(lineno)
                line_ids[f"line-{lineno}"] = {"id": rid} if rid is not None else {}
            if planned:
                rids = add_planned(engine, items, engine.scheduler.policy)
            else:
                rids = [engine.add_request(text, params, request_id=rid, prompt_token_ids=ids)
                        for text, ids, params, rid in items]
            for req, lineno in zip(rids, linenos, strict=True):
                in_flight[req] = lineno

        while not exhausted or in_flight:
            # Planned: read half a window at a time, so that each plan sees many requests at once.
            # Unplanned: keep the window full.
            if not exhausted and len(in_flight) <= (window // 2 if planned else window - 1):
                read_chunk(window - len(in_flight))
            for out in engine.step() if in_flight else ():
                if not out.finished:
                    continue
                lineno = in_flight.pop(out.request_id)
                rec = {"index": lineno, **line_ids.pop(out.request_id), **output_record(out)}
                out_tokens += sum(len(c.token_ids) for c in out.outputs)
                done[lineno] = rec
                bar.update(1)
                bar.set_postfix(out_tok_s=f"{out_tokens / (time.perf_counter() - t0):.1f}")
            flush()
        flush()
    bar.close()
    elapsed = time.perf_counter() - t0
    bm = engine.block_manager
    queries = bm.prefix_queries - queries0
    return {"requests": total_lines, "errors": errors, "output_tokens": out_tokens,
            "elapsed_s": round(elapsed, 3), "output_tok_s": round(out_tokens / elapsed, 2) if elapsed else 0.0,
            "prefix_hit_rate": round((bm.prefix_hits - hits0) / queries, 4) if queries else 0.0}



def run_file_long_context(llm, input_path: Path, output_path: Path, defaults: dict, window: int, long_context,
                          progress: bool = True) -> dict:
    """`tessera run --long-context ...`: `window` lines at a time through LLM.generate / LLM.chat with
    long_context (segment mode scores all of a chunk's segments as one batch before answering). A bad
    line becomes an error record; the rest of its chunk still runs."""
    from tessera.longctx import SegmentConfig, segments

    engine = llm.engine
    total_lines = sum(1 for _ in input_path.open())
    errors = out_tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total_lines, desc="requests", unit="req", disable=not progress, dynamic_ncols=True)

    def is_chat(prompt) -> bool:
        return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)

    def check(prompt, params) -> None:
        params.validate()
        if isinstance(long_context, SegmentConfig):
            if is_chat(prompt):
                segments.from_chat(engine.tokenizer, prompt, long_context)
            else:
                segments.from_prompt(engine, prompt, long_context)
        else:
            if is_chat(prompt):
                prompt = apply_chat_template(engine.tokenizer, prompt)
            engine.check_request(engine.encode_prompt(prompt)[1], params)

    def run(group: list[tuple[int, object, SamplingParams]]) -> dict[int, object]:
        """line -> RequestOutput or error message; chats and plain prompts go as one call each."""
        results: dict[int, object] = {}
        for chats in (False, True):
            part = [g for g in group if is_chat(g[1]) == chats]
            if not part:
                continue
            call = llm.chat if chats else llm.generate
            try:
                outs = call([p for _, p, _ in part], [sp for _, _, sp in part], use_tqdm=False,
                            long_context=long_context)
                results.update({n: o for (n, _, _), o in zip(part, outs, strict=True)})
            except TesseraError:  # one line broke the call: run them one by one
                for n, p, sp in part:
                    try:
                        results[n] = call([p], [sp], use_tqdm=False, long_context=long_context)[0]
                    except TesseraError as e:
                        results[n] = str(e)
        return results

    with input_path.open() as fin, output_path.open("w") as fout:
        lines = list(enumerate(fin))
        for at in range(0, len(lines), window):
            records: dict[int, dict] = {}
            group = []
            for lineno, line in lines[at:at + window]:
                try:
                    if not line.strip():
                        raise InvalidRequestError("empty line")
                    prompt, params, rid = parse_line(line, defaults, engine.tokenizer, keep_messages=True)
                    check(prompt, params)
                except TesseraError as e:
                    records[lineno] = {"index": lineno, "error": str(e)}
                    continue
                records[lineno] = {"index": lineno, **({"id": rid} if rid is not None else {})}
                group.append((lineno, prompt, params))
            for lineno, out in run(group).items():
                if isinstance(out, str):
                    records[lineno] = {**records[lineno], "error": out}
                    continue
                records[lineno].update(output_record(out))
                out_tokens += sum(len(c.token_ids) for c in out.outputs)
            for lineno in sorted(records):
                errors += "error" in records[lineno]
                fout.write(json.dumps(records[lineno]) + "\n")
            bar.update(len(records))
            bar.set_postfix(out_tok_s=f"{out_tokens / (time.perf_counter() - t0):.1f}")
    bar.close()
    elapsed = time.perf_counter() - t0
    return {"requests": total_lines, "errors": errors, "output_tokens": out_tokens, "elapsed_s": round(elapsed, 3),
            "output_tok_s": round(out_tokens / elapsed, 2) if elapsed else 0.0}
