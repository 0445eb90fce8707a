"""The output processor: incremental detokenization, stop checks and abort, on the default model
(SmolLM2-135M-Instruct, a byte-level BPE tokenizer). Text always agrees with the tokens (the decoded
tokens, cut at the stop string as vLLM cuts it), and streamed text equals non-streamed text."""

from __future__ import annotations

import pytest

from tessera import LLM, SamplingParams

FRANCE = "The capital of France is"  # greedy: " Paris.\n\nThe answer is: 2018-01..."
EMOJI = "The emoji for a smile is"  # greedy: ' "👍👍👍...', each emoji split over three tokens
TOKYO = "Tokyo in Japanese is written as"  # greedy: ' 中国, which is ...', 国 split over two tokens
COUNT = "Count with me: 1, 2, 3,"

CASES = [
    (FRANCE, SamplingParams(temperature=0, max_tokens=16, min_tokens=5, stop=["."])),
    (FRANCE, SamplingParams(temperature=0, max_tokens=16, min_tokens=1, stop=["."])),
    (FRANCE, SamplingParams(temperature=0, max_tokens=16, stop=["\n\nThe"], include_stop_str_in_output=True)),
    (FRANCE, SamplingParams(temperature=0, max_tokens=16, min_tokens=2, stop=["s.\n", "\n\n"])),
    (COUNT, SamplingParams(temperature=0, max_tokens=24, stop=[", 7", "\n\n"])),
    (EMOJI, SamplingParams(temperature=0, max_tokens=20)),  # ends inside a character
    (EMOJI, SamplingParams(temperature=0, max_tokens=20, stop=["👍👍"], min_tokens=4)),
    (TOKYO, SamplingParams(temperature=0, max_tokens=12, stop=["国,"])),
    (FRANCE, SamplingParams(temperature=0.8, max_tokens=24, seed=3, stop=["e", "an"], min_tokens=3)),
]


@pytest.fixture(scope="module")
def smol():
    return LLM(progress=False, max_model_len=2048)


def decode(llm, ids) -> str:
    return llm.get_tokenizer().decode(ids, skip_special_tokens=True)


def stream(llm, prompt, params):
    """Every output of a streamed request, the final one last."""
    eng = llm.engine
    rid = eng.add_request(prompt, params, stream=True)
    outs = []
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.request_id == rid]
    assert outs and outs[-1].finished
    return outs


def check_agrees(llm, c, params: SamplingParams) -> None:
    """text == decode(token_ids), cut at the stop string; a stop string only in text after min_tokens."""
    full = decode(llm, c.token_ids)
    head = len(decode(llm, c.token_ids[: params.min_tokens])) if params.min_tokens else 0
    if c.finish_reason == "stop" and isinstance(c.stop_reason, str):
        stop = c.stop_reason
        at = full.find(stop, max(0, head - len(stop) + 1))
        assert at >= 0, (full, stop)
        assert c.text == full[: at + len(stop) if params.include_stop_str_in_output else at]
        # it is the first stop string the text holds past min_tokens, and it came with the last token
        assert all(full.find(s, max(0, head - len(s) + 1), at + len(stop) - 1) < 0 for s in params.stop_strings)
    else:
        assert c.text == full
        assert not any(full.find(s, max(0, head - len(s) + 1)) >= 0 for s in params.stop_strings)


def test_stop_string_is_not_looked_for_before_min_tokens(smol):
    """The issue's example: the '.' of ' Paris.' comes before min_tokens, so it does not stop the
    request, and the text is not cut back to ' Paris' beside 16 tokens."""
    sp = SamplingParams(temperature=0, max_tokens=16, min_tokens=5, stop=["."])
    out = smol.generate(FRANCE, sp, use_tqdm=False)[0]
    assert decode(smol, out.token_ids[:5]) == " Paris.\n\nThe"
    assert out.text == decode(smol, out.token_ids)
    assert out.finish_reason == "length" and len(out.token_ids) == 16
    # without min_tokens the same stop string ends it at once
    early = smol.generate(FRANCE, SamplingParams(temperature=0, max_tokens=16, stop=["."]), use_tqdm=False)[0]
    assert (early.text, early.token_ids, early.outputs[0].stop_reason) == (" Paris", out.token_ids[:2], ".")


@pytest.mark.parametrize("case", range(len(CASES)))
def test_text_agrees_with_tokens_and_streamed_equals_final(smol, case):
    prompt, params = CASES[case]
    final = smol.generate(prompt, params, use_tqdm=False)[0]
    check_agrees(smol, final.outputs[0], params)
    outs = stream(smol, prompt, params)
    last = outs[-1].outputs[0]
    assert (last.text, last.token_ids, last.finish_reason, last.stop_reason) == (
        final.text, final.token_ids, final.finish_reason, final.outputs[0].stop_reason)
    # what a stream shows only ever grows: no step takes back text an earlier step showed
    shown = ""
    for o in outs:
        assert o.outputs[0].text.startswith(shown), (shown, o.outputs[0].text)
        shown = o.outputs[0].text


def test_a_partial_character_at_the_end_is_flushed(smol):
    out = smol.generate(EMOJI, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert out.text == decode(smol, out.token_ids) and out.text.endswith("👍\ufffd")


def test_stop_token_text_is_left_out_unless_asked_for(smol):
    """As vLLM: a stop token id (like EOS) ends the output without adding its text, unless
    include_stop_str_in_output."""
    period = smol.get_tokenizer().encode(".")[0]
    out = smol.generate(FRANCE, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[period]),
                        use_tqdm=False)[0]
    assert out.token_ids[-1] == period and out.outputs[0].stop_reason == period
    assert out.text == " Paris"
    keep = smol.generate(FRANCE, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[period],
                                                include_stop_str_in_output=True), use_tqdm=False)[0]
    assert keep.text == " Paris."


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                                    SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, stop=["zzz"])])
@pytest.mark.parametrize("streamed", [False, True])
def test_abort_returns_the_text_of_the_tokens_generated(smol, params, streamed):
    eng = smol.engine
    rid = eng.add_request(EMOJI, params, stream=streamed)
    while not eng.requests[rid].seqs[0].num_output_tokens >= 8:
        eng.step()
    out = eng.abort(rid)
    c = out.outputs[0]
    assert out.finished and c.finish_reason == "abort" and len(c.token_ids) >= 8
    assert c.text == decode(smol, c.token_ids) and c.text.startswith(' "👍')
    assert not eng.has_unfinished_requests() and eng.block_manager.num_used_blocks == 0


def test_plain_decoding_gives_the_same_text_as_decode_stream(smol, monkeypatch):
    """A tokenizer without a fast backend (or an old tokenizers) decodes a few tokens of context per
    step instead of DecodeStream: the text is the same."""
    from tessera.engine import output_processor

    prompts, params = [p for p, _ in CASES], [sp for _, sp in CASES]
    fast = smol.generate(prompts, params, use_tqdm=False)
    monkeypatch.setattr(output_processor, "DecodeStream", None)
    plain = smol.generate(prompts, params, use_tqdm=False)
    assert [o.text for o in plain] == [o.text for o in fast]
    assert [o.outputs[0].stop_reason for o in plain] == [o.outputs[0].stop_reason for o in fast]
