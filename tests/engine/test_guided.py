"""Structured output offline: a random-weight model (which otherwise emits garbage) with SmolLM2's
tokenizer must produce output inside its constraint, greedy and sampled, n > 1, under preemption,
and mixed with unconstrained requests whose greedy output stays what it is alone."""

from __future__ import annotations

import json
import re
import shutil

import jsonschema  # noqa: F401  (dev dependency: fail loudly without it)
import pytest
import xgrammar  # (serve dependency: fail loudly without it)
from conftest import save_random_model

from tessera import LLM, InvalidRequestError, SamplingParams
from tessera.engine.model_runner import ModelRunner
from tessera.guided_params import GuidedDecodingParams
from tessera.models.default_model import default_model_dir

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "color", "ok"],
}
REGEX = r"(\d{3})-[a-z]{2,4}"
CHOICES = ["yes", "no", "maybe so"]
GRAMMAR = 'root ::= "(" num (" + " num)* ")"\nnum ::= [1-9] [0-9]?'
GRAMMAR_RE = re.compile(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)")
PROMPTS = ["Give me a record:", "The answer is", "Tell me", "Compute"]


@pytest.fixture(scope="module")
def guided_model(tmp_path_factory):
    """Random weights over SmolLM2's 49152-token vocabulary, with its tokenizer."""
    path = save_random_model(tmp_path_factory.mktemp("guided"), "llama", vocab_size=49152, eos_token_id=2)
    for f in default_model_dir(progress=False).iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def llm(guided_model):
    return LLM(str(guided_model), dtype="float32", kv_cache_memory=64 << 20, max_model_len=512, progress=False)


def guided(**kw) -> GuidedDecodingParams:
    return GuidedDecodingParams(**kw)


def check(kind: str, text: str, finish: str, grammars=None) -> None:
    if kind == "json":
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "json_object":
        # Free-form strings let a random model write on past max_tokens: then the text must still be
        # a prefix of some JSON object, which the grammar's own matcher checks.
        if finish == "stop":
            assert isinstance(json.loads(text), dict), text
        else:
            matcher = xgrammar.GrammarMatcher(grammars.compile(GuidedDecodingParams(json_object=True)))
            assert text.startswith("{") and matcher.accept_string(text), text
    elif kind == "regex":
        assert finish == "stop", text
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert finish == "stop" and text in CHOICES, text
    else:
        assert finish == "stop", text
        assert GRAMMAR_RE.fullmatch(text), text


CASES = {
    "json": dict(json=SCHEMA),
    "json_object": dict(json_object=True),
    "regex": dict(regex=REGEX),
    "choice": dict(choice=CHOICES),
    "grammar": dict(grammar=GRAMMAR),
}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_outputs_match_their_constraint(llm, temperature):
    free = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert not free.outputs[0].text.lstrip().startswith("{")  # the random model alone emits no JSON
    params = [SamplingParams(temperature=temperature, max_tokens=160, seed=i, n=2, guided_decoding=guided(**kw))
              for i, kw in enumerate(CASES.values())]
    outs = llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(params))], params, use_tqdm=False)
    for kind, out in zip(CASES, outs, strict=True):
        assert len(out.outputs) == 2
        for o in out.outputs:
            check(kind, o.text, o.finish_reason, llm.engine.grammars)


def test_mixed_batch_leaves_unconstrained_greedy_output_unchanged(llm):
    plain = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, plain, use_tqdm=False)]
    mixed_params = []
    for i in range(len(PROMPTS)):
        mixed_params += [plain, SamplingParams(temperature=0.0 if i % 2 else 1.0, max_tokens=80, seed=i,
                                               guided_decoding=guided(json=SCHEMA))]
    mixed_prompts = [p for p in PROMPTS for _ in range(2)]
    outs = llm.generate(mixed_prompts, mixed_params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[0::2]] == alone
    for o in outs[1::2]:
        check("json", o.outputs[0].text, o.outputs[0].finish_reason)


def test_same_schema_compiles_once_and_dict_params_work(llm):
    cache = llm.engine.grammars
    before = cache.num_compiled
    p = SamplingParams(temperature=0, max_tokens=40, guided_decoding={"regex": r"[ab]{3}"})
    for _ in range(3):
        out = llm.generate("x", p, use_tqdm=False)[0].outputs[0]
        assert re.fullmatch(r"[ab]{3}", out.text) and out.finish_reason == "stop"
    assert cache.num_compiled == before + 1


def test_preemption_keeps_guided_results_and_abort_frees_matchers(guided_model, llm):
    """A pool too small for the batch preempts sequences mid-output; a recompute keeps its matcher as
    it was (advancing it again over its tokens would break the grammar or get the sequence aborted), so
    greedy outputs equal the unpreempted ones and sampled ones stay valid."""
    prompts = PROMPTS * 2
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, max_tokens=100, seed=i,
                             guided_decoding=guided(json=SCHEMA)) for i in range(len(prompts))]
    want = llm.generate(prompts, params, use_tqdm=False)
    per_block = ModelRunner.kv_bytes_per_block(llm.engine.model_config, 16, llm.engine.dtype)
    small = LLM(str(guided_model), dtype="float32", max_model_len=512, progress=False, prefix_planning="off",
                kv_cache_memory=8 * per_block)  # 8 blocks of 16 tokens: room for about 2 sequences
    # Each step, every running guided sequence's matcher has accepted exactly its output tokens
    engine = small.engine
    step = engine.step

    def checked_step():
        out = step()
        for seq in engine.scheduler.running + list(engine.scheduler.waiting):
            if seq.guided is not None:
                assert seq.guided.num_accepted == seq.num_output_tokens
        return out

    engine.step = checked_step
    got = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.total_preemptions > 0
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        check("json", b.outputs[0].text, b.outputs[0].finish_reason)
        if i % 2:  # greedy
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
    engine = llm.engine  # abort
    rid = engine.add_request("Tell me", SamplingParams(max_tokens=50, n=3, guided_decoding=guided(json=SCHEMA)))
    engine.step()
    seqs = list(engine.requests[rid].seqs)
    assert all(s.guided is not None for s in seqs)
    out = engine.abort(rid)
    assert all(s.guided is None for s in seqs) and all(o.finish_reason == "abort" for o in out.outputs)


@pytest.mark.parametrize("kw, needle", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "json"),
    (dict(regex="(unclosed"), "regex"),
    (dict(grammar="root ::= missing_rule"), "grammar"),
    (dict(regex="a", choice=["a"]), "exactly one"),
    (dict(), "exactly one"),
    (dict(choice=[]), "choice"),
    (dict(json="{not json"), "json"),
])
def test_bad_constraints_are_invalid_request_errors(llm, kw, needle):
    with pytest.raises(InvalidRequestError, match=needle):
        llm.generate("x", SamplingParams(max_tokens=4, guided_decoding=GuidedDecodingParams(**kw)), use_tqdm=False)


def test_grammar_end_wins_over_min_tokens_and_ignore_eos(llm):
    """A finished grammar allows only EOS: min_tokens (which bans EOS) cannot hold it open, and with
    ignore_eos the request still ends when the matcher terminates."""
    for kw in (dict(min_tokens=10), dict(ignore_eos=True)):
        p = SamplingParams(temperature=0, max_tokens=30, guided_decoding=guided(choice=CHOICES), **kw)
        out = llm.generate("Well", p, use_tqdm=False)[0].outputs[0]
        assert out.text in CHOICES and out.finish_reason == "stop", (kw, out)
