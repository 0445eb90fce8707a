"""XL3M segments: the segmenter's coverage, the key context's order and budget, the chat split, and
segment mode equal to plain generation when every segment is kept."""

from __future__ import annotations

import random

import pytest
from conftest import random_prompts

from tessera import LLM, SamplingParams
from tessera.errors import InvalidRequestError
from tessera.longctx import SegmentConfig
from tessera.longctx.segments import (
    LongPrompt,
    by_certainty,
    key_context,
    merge_spans,
    select_segments,
    sentence_ends,
    snap_span,
    split_segments,
)


@pytest.mark.parametrize("n,size,overlap", [(1, 8, 0), (8, 8, 2), (9, 8, 2), (100, 16, 0), (100, 16, 5),
                                            (1000, 64, 63), (257, 32, 16)])
def test_segments_cover_every_token_once_apart_from_overlap(n, size, overlap):
    spans = split_segments(n, size, overlap)
    counts = [0] * n
    for s, e in spans:
        assert 0 <= s < e <= n and e - s <= size
        for t in range(s, e):
            counts[t] += 1
    assert all(c >= 1 for c in counts)
    for (s0, e0), (s1, _) in zip(spans, spans[1:], strict=False):
        assert s1 == s0 + size - overlap and e0 - s1 == overlap  # neighbours share exactly the overlap
    assert sum(counts) == n + overlap * (len(spans) - 1)
    assert spans[-1][1] == n and spans[0][0] == 0


@pytest.mark.parametrize("n,size,overlap", [(1, 8, 4), (8, 8, 4), (9, 8, 4), (100, 16, 8), (100, 16, 5),
                                            (257, 32, 16), (1000, 128, 64)])
def test_a_lead_segment_puts_every_token_in_a_segments_last_stride(n, size, overlap):
    spans = split_segments(n, size, overlap, lead=True)
    stride = size - overlap
    assert spans[0] == (0, min(stride, n)) and spans[-1][1] == n
    for (_, e0), (s1, _) in zip(spans, spans[1:], strict=False):
        assert e0 - s1 == min(overlap, e0)  # neighbours share the overlap (the first: all it has)
    tails = [0] * n
    for s, e in spans:
        assert 0 <= s < e <= n and e - s <= size
        for t in range(max(s, e - stride), e):
            tails[t] += 1
    # Every token in some segment's last stride (with overlap = size / 2: its second half); twice only
    # where the last segment, cut short by the input's end, reaches back over its neighbour's.
    assert all(c >= 1 for c in tails)
    assert all(c == 1 for c in tails[: spans[-1][0]]) and len(spans) == -(-n // stride)


def test_key_context_keeps_original_order_and_never_repeats_a_token():
    rng = random.Random(0)
    body = list(range(1000, 1500))
    lp = LongPrompt(head=[1, 2], body=body, question=[7, 8, 9])
    spans = split_segments(len(body), 40, 10)
    for _ in range(50):
        chosen = sorted(rng.sample(range(len(spans)), rng.randint(1, len(spans))))
        ids = key_context(lp, spans, chosen)
        assert ids[:2] == [1, 2] and ids[-3:] == [7, 8, 9]
        middle = ids[2:-3]
        assert middle == sorted(set(middle))  # original order, each token once
        assert set(middle) == {body[t] for i in chosen for t in range(*spans[i])}
    assert key_context(lp, spans, list(range(len(spans)))) == lp.token_ids


def test_excerpts_are_set_apart_by_the_inputs_separator():
    body = list(range(100, 130)) + [0]  # ends with its separator, as a "text, blank line, question" body
    lp = LongPrompt(head=[1], body=body, question=[7, 8], separator=[0])
    spans = [(0, 5), (3, 8), (12, 15), (26, 31)]
    # overlapping spans are one excerpt; each excerpt ends with the separator, once (the last one already
    # reaches the body's end, where the input's own separator stands)
    assert key_context(lp, spans, [0, 1, 2, 3]) == [1, *range(100, 108), 0, 112, 113, 114, 0, *range(126, 130), 0,
                                                  7, 8]
    assert key_context(lp, spans, [2]) == [1, 112, 113, 114, 0, 7, 8]
    assert key_context(lp, [(0, len(body))], [0]) == lp.token_ids
    # the budget counts a separator per excerpt: two excerpts of 5 and 3 tokens need 10 with a gap of 1
    assert select_segments(spans, [0, 2], top_k=None, max_body_tokens=9, gap=1) == [0]
    assert select_segments(spans, [0, 2], top_k=None, max_body_tokens=10, gap=1) == [0, 2]


def test_snap_widens_a_span_to_whole_sentences_within_the_limit():
    ends = [False] * 30
    for i in (4, 17, 25):  # tokens that end a sentence
        ends[i] = True
    assert snap_span((8, 12), ends, limit=8) == (5, 18)  # after token 4 ... through token 17
    assert snap_span((8, 12), ends, limit=2) == (8, 12)  # no sentence end within 2 tokens: as cut
    assert snap_span((5, 18), ends, limit=8) == (5, 18)  # already whole sentences
    assert snap_span((2, 27), ends, limit=8) == (0, 30)  # the input's edges count as sentence ends
    assert snap_span((19, 22), ends, limit=4) == (18, 26)


def test_sentence_ends_come_from_the_tokens_text():
    from transformers import AutoTokenizer

    from tessera.models.default_model import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    ids = tok.encode("One two. Three four? Five\nsix", add_special_tokens=False)
    ends = sentence_ends(tok, ids)
    assert [tok.decode(ids[: i + 1]) for i, e in enumerate(ends) if e] == ["One two.", "One two. Three four?",
                                                                          "One two. Three four? Five\n"]
    assert sentence_ends(None, ids) == [False] * len(ids)


def test_select_takes_the_most_certain_segments_that_fit():
    spans = split_segments(100, 20, 0)  # five segments
    order = by_certainty([3.0, 0.5, 2.0, 0.1, 1.0])
    assert order == [3, 1, 4, 2, 0] and by_certainty([1.0, 1.0, 0.5]) == [2, 0, 1]
    assert select_segments(spans, order, top_k=2, max_body_tokens=100) == [1, 3]
    assert select_segments(spans, order, top_k=None, max_body_tokens=60) == [1, 3, 4]
    assert select_segments(spans, order, top_k=None, max_body_tokens=1000) == [0, 1, 2, 3, 4]
    assert merge_spans([(30, 40), (0, 10), (5, 20), (20, 25)]) == [(0, 25), (30, 40)]


@pytest.fixture(scope="module")
def tiny(model_dir):
    return LLM(str(model_dir("llama")), progress=False)


@pytest.mark.parametrize("layout", [dict(overlap=8, lead=False, snap_tokens=0),
                                    dict(overlap=12, lead=True, snap_tokens=5)],
                         ids=["plain-cut", "lead-and-snap"])
def test_all_segments_equals_plain_generation(tiny, layout):
    prompts = random_prompts([150, 90, 61], seed=11)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = tiny.generate(prompts, greedy, use_tqdm=False)
    cfg = SegmentConfig(segment_size=24, question_tokens=6, top_k=None, **layout)
    seg = tiny.generate(prompts, greedy, use_tqdm=False, long_context=cfg)
    for p, a, b in zip(prompts, plain, seg, strict=True):
        n = b.metrics["num_segments"]
        assert n > 1 and b.metrics["selected_segments"] == list(range(n))
        assert len(b.metrics["segment_entropies"]) == b.metrics["num_segments"]
        assert b.prompt_token_ids == p and b.token_ids == a.token_ids
    assert tiny.engine.block_manager.num_used_blocks == 0


def test_segments_run_inputs_past_the_window(tiny):
    window = tiny.engine.max_model_len
    prompt = random_prompts([3 * window], seed=2)[0]
    cfg = SegmentConfig(segment_size=200, overlap=20, question_tokens=10, top_k=2, snap_tokens=64, lead=False)
    out = tiny.generate(prompt, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False, long_context=cfg)[0]
    m = out.metrics
    assert m["input_tokens"] == 3 * window and m["num_segments"] >= 3 * window // 180
    assert len(m["selected_segments"]) == 2 and len(out.token_ids) == 8
    # the 8 most certain by the question's entropy answer alone; the 2 most relevant answers are kept
    candidates = sorted(range(m["num_segments"]), key=lambda i: m["segment_entropies"][i])[:8]
    assert sorted(m["answer_scores"]) == sorted(candidates)
    # answers the question does not make more certain go last
    gains = m["question_gains"]
    assert sorted(gains) == sorted(candidates)
    best = sorted(candidates, key=lambda j: (gains[j] >= 0, m["answer_scores"][j], j))[:2]
    assert m["selected_segments"] == sorted(best)
    # a candidate's score recomputed from plain requests: its greedy answer, then that answer's mean
    # next-token entropy after [segment + question] less that after the question alone (its score) and
    # less that after the segment alone (the question's gain)
    from tessera.longctx.segments import from_prompt

    lp = from_prompt(tiny.engine, prompt, cfg)
    span = split_segments(len(lp.body), cfg.segment_size, cfg.overlap)[candidates[3]]
    s, e = snap_span(span, sentence_ends(tiny.get_tokenizer(), lp.body), cfg.snap_tokens)
    seg = lp.head + lp.body[s:e] + lp.question
    answer = tiny.generate(seg, SamplingParams(temperature=0, max_tokens=cfg.rerank_tokens),
                           use_tqdm=False)[0].token_ids
    sp = SamplingParams(max_tokens=1, prompt_entropies=len(answer) + 1)
    both, question_only, segment_only = (sum(o.prompt_entropies[:-1]) for o in tiny.generate(
        [seg + answer, lp.head + lp.question + answer, lp.head + lp.body[s:e] + answer], sp, use_tqdm=False))
    assert m["answer_scores"][candidates[3]] == pytest.approx((both - question_only) / len(answer), rel=1e-5, abs=1e-6)
    assert gains[candidates[3]] == pytest.approx((both - segment_only) / len(answer), rel=1e-5, abs=1e-6)
    assert out.prompt_token_ids[-10:] == prompt[-10:] and len(out.prompt_token_ids) <= 2 * (200 + 2 * 64) + 10
    with pytest.raises(InvalidRequestError, match="does not fit"):
        tiny.generate(prompt, SamplingParams(max_tokens=8), use_tqdm=False,
                      long_context=SegmentConfig(segment_size=window, overlap=0))
    with pytest.raises(InvalidRequestError, match="long_context"):
        tiny.generate(prompt, None, use_tqdm=False, long_context="everything")


def test_stage_one_scores_can_be_reused(tiny):
    """generate_segments with a run's own segment_entropies gives that run back (a sweep over rerank and
    top_k reuses stage one); other scores choose other segments."""
    from tessera.longctx.segments import from_prompt, generate_segments

    window = tiny.engine.max_model_len
    prompt = random_prompts([2 * window], seed=4)[0]
    cfg = SegmentConfig(segment_size=200, overlap=20, question_tokens=10, top_k=1, rerank=0, lead=False)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = tiny.generate(prompt, sp, use_tqdm=False, long_context=cfg)[0]
    scores = first.metrics["segment_entropies"]
    lp = from_prompt(tiny.engine, prompt, cfg)
    again = generate_segments(tiny, [lp], [sp], cfg, False, scores=[list(scores)])[0]
    assert again.token_ids == first.token_ids
    assert again.metrics["selected_segments"] == first.metrics["selected_segments"]
    flipped = generate_segments(tiny, [lp], [sp], cfg, False, scores=[[-x for x in scores]])[0]
    worst = max(range(len(scores)), key=lambda j: (scores[j], -j))
    assert flipped.metrics["selected_segments"] == [worst] != first.metrics["selected_segments"]
    with pytest.raises(InvalidRequestError, match="saved segment scores"):  # another cut's scores
        generate_segments(tiny, [lp], [sp], cfg, False, scores=[list(scores[:-1])])


@pytest.mark.parametrize("score_positions", [None, 3])
def test_segment_score_is_the_mean_of_its_most_certain_question_positions(tiny, score_positions):
    """Each segment's score, recomputed from a plain request with prompt entropies over [segment +
    question]: the mean over the scored question positions, or over the `score_positions` lowest."""
    from tessera.longctx.segments import from_prompt

    prompt = random_prompts([400], seed=7)[0]
    cfg = SegmentConfig(segment_size=120, overlap=20, question_tokens=12, score="entropy", score_from=0.25,
                        score_positions=score_positions, top_k=1, rerank=0, lead=False)
    out = tiny.generate(prompt, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False, long_context=cfg)[0]
    lp = from_prompt(tiny.engine, prompt, cfg)
    spans = split_segments(len(lp.body), cfg.segment_size, cfg.overlap)
    lo, hi = lp.scored_positions(cfg.score_from)
    assert (lo, hi) == (3, 12)
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_entropies=len(lp.question))
    singles = tiny.generate([lp.head + lp.body[s:e] + lp.question for s, e in spans], sp, use_tqdm=False)
    want = []
    for o in singles:
        scored = sorted(o.prompt_entropies[lo:hi])[:score_positions]
        want.append(sum(scored) / len(scored))
    assert out.metrics["segment_entropies"] == pytest.approx(want, rel=1e-5)
    assert out.metrics["selected_segments"] == [min(range(len(want)), key=want.__getitem__)]


def test_gain_score_counts_only_the_question_words_a_segment_cannot_copy(tiny):
    """Each segment's "gain" score recomputed from plain requests: the mean, over question positions whose
    next token the segment does not hold, of the entropy after the question alone less that after
    [segment + question] (negated: lower is more relevant)."""
    from tessera.longctx.segments import from_prompt, uncopied_gain

    prompt = random_prompts([400], seed=5)[0]
    cfg = SegmentConfig(segment_size=100, overlap=10, question_tokens=12, top_k=1, rerank=0, lead=False,
                        score="gain")
    out = tiny.generate(prompt, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False, long_context=cfg)[0]
    lp = from_prompt(tiny.engine, prompt, cfg)
    spans = split_segments(len(lp.body), cfg.segment_size, cfg.overlap)
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_entropies=len(lp.question))
    runs = tiny.generate([lp.head + lp.body[s:e] + lp.question for s, e in spans] + [lp.head + lp.question], sp,
                         use_tqdm=False)
    alone = runs[-1].prompt_entropies
    want = []
    for (s, e), o in zip(spans, runs, strict=False):
        held = set(lp.body[s:e])
        kept = [j for j in range(len(lp.question)) if j + 1 >= len(lp.question) or lp.question[j + 1] not in held]
        kept = kept or list(range(len(lp.question)))
        want.append(-sum(alone[j] - o.prompt_entropies[j] for j in kept) / len(kept))
        assert -uncopied_gain(lp, lp.body[s:e], o.prompt_entropies, alone) == pytest.approx(want[-1])
    assert out.metrics["segment_entropies"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    # a position whose next token the segment holds does not count, however certain it is
    lp2 = LongPrompt([], [5, 6, 7], [1, 2, 3])
    assert uncopied_gain(lp2, [2], [0.0, 0.0, 0.0], [1.0, 3.0, 3.0]) == pytest.approx(3.0)
    assert uncopied_gain(lp2, [2, 3], [0.0, 0.0, 0.0], [1.0, 3.0, 3.0]) == pytest.approx(3.0)  # only the last
    assert uncopied_gain(lp2, [9], [0.0, 0.0, 0.0], [1.0, 3.0, 3.0]) == pytest.approx(7 / 3)


def test_chat_split_reassembles_the_chat_prompt():
    from tessera.longctx.segments import from_chat
    from tessera.models.default_model import default_model_dir
    from tessera.tokenizer import apply_chat_template, load_tokenizer

    tok = load_tokenizer(default_model_dir(progress=False))
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Here is a long text about gardens. " * 20 + "What grows best?"}]
    full = apply_chat_template(tok, conv)
    lp = from_chat(tok, conv, SegmentConfig(question_tokens=5))
    assert lp.token_ids == full and len(lp.body) > 100
    lp = from_chat(tok, conv, SegmentConfig(question="What grows best?"))
    assert tok.decode(lp.question).startswith("What grows best?")
    with pytest.raises(InvalidRequestError, match="does not end with"):
        from_chat(tok, conv, SegmentConfig(question="Why?"))


def test_the_last_paragraph_is_the_question_when_none_is_given():
    from tessera.longctx.segments import from_chat, last_paragraph
    from tessera.models.default_model import default_model_dir
    from tessera.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_dir(progress=False))
    text = "Some text about gardens. " * 30 + "\n\nWhat grows best here?"
    conv = [{"role": "user", "content": text}]
    lp = from_chat(tok, conv, SegmentConfig())
    assert tok.decode(lp.question[: len(lp.question) - lp.num_template_tokens]) == "What grows best here?"
    assert tok.decode(lp.body).endswith("gardens. \n\n")
    # the blank line sets the question apart: a key context of one excerpt from the middle keeps it
    assert tok.decode(lp.separator).strip() == "" and lp.body[-len(lp.separator):] == lp.separator
    key = tok.decode(key_context(lp, [(10, 20)], [0]))
    assert key.count("\n\nWhat grows best here?") == 1
    # a last paragraph longer than question_tokens, or none: the input's last question_tokens tokens
    for cfg, content in ((SegmentConfig(question_tokens=3), text), (SegmentConfig(question_tokens=7),
                                                                      text.replace("\n\n", " "))):
        lp = from_chat(tok, [{"role": "user", "content": content}], cfg)
        assert len(lp.question) - lp.num_template_tokens == cfg.question_tokens
        assert lp.separator == []  # the question was cut by count: nothing sets it apart
    assert last_paragraph(tok, text, 64) == "What grows best here?"
    assert last_paragraph(tok, "\n\nonly a question?", 64) is None and last_paragraph(tok, "text\n\n  ", 64) is None


@pytest.mark.parametrize("score_positions", [None, 2])
def test_contrast_score_is_each_segments_surprise_against_the_typical_segment(tiny, score_positions):
    """Each segment's "contrast" score recomputed from plain requests: at every question word position, the
    segments' median entropy less the segment's own, over their median absolute deviation (+1e-3); minus
    the mean of its largest `score_positions` such surprises (lower: more relevant)."""
    from statistics import median

    from tessera.longctx.segments import contrast_scores, from_prompt

    prompt = random_prompts([400], seed=11)[0]
    cfg = SegmentConfig(segment_size=60, overlap=10, question_tokens=12, top_k=1, rerank=0, lead=False,
                        score="contrast", score_positions=score_positions)
    out = tiny.generate(prompt, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False, long_context=cfg)[0]
    lp = from_prompt(tiny.engine, prompt, cfg)
    spans = split_segments(len(lp.body), cfg.segment_size, cfg.overlap)
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_entropies=len(lp.question))
    runs = tiny.generate([lp.head + lp.body[s:e] + lp.question for s, e in spans], sp, use_tqdm=False)
    columns = list(zip(*[o.prompt_entropies for o in runs], strict=True))
    mid = [median(c) for c in columns]
    spread = [median(abs(x - m) for x in c) + 1e-3 for c, m in zip(columns, mid, strict=True)]
    want = []
    for o in runs:
        z = sorted(((m - x) / d for x, m, d in zip(o.prompt_entropies, mid, spread, strict=True)), reverse=True)
        want.append(-sum(z[:score_positions]) / len(z[:score_positions]))
    assert len(want) > 5
    assert out.metrics["segment_entropies"] == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert out.metrics["selected_segments"] == [min(range(len(want)), key=want.__getitem__)]
    # A position every segment makes certain decides nothing; one that a single segment makes certain does.
    lp2 = LongPrompt([], [], [1, 2, 3, 4, 9], num_template_tokens=1)
    rows = [[0.01, 3.0, 3.0, 3.0, 0.0], [0.02, 2.9, 0.5, 3.1, 0.0], [0.0, 3.1, 3.0, 2.9, 0.0]]
    scores = contrast_scores(lp2, rows, 1)
    assert by_certainty(scores)[0] == 1
    assert scores == pytest.approx([-0.0, -2.5 / 1e-3, -0.1 / 0.101])  # (no other segment moved there)
