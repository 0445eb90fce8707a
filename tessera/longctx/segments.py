"""XL3M segment-wise inference: answer questions about inputs far longer than the model's window.

A long input is split into a head (template start, BOS), a body and a question (the input's last tokens,
or an explicit question it ends with). The body is cut into overlapping segments; every segment runs as
[head + segment + question] through the engine as one ordinary batch, and is scored by the model's mean
next-token entropy over the question positions (by default over its two most certain ones): the lower,
the more the segment tells the model about the question. A second look (`rerank`) lets the few most
certain segments each answer the question alone and reorders them by the model's certainty on that
answer. The k most relevant segments (widened to whole sentences with `snap_tokens`), in their
original order (overlaps merged), form with the head and the question a key context that fits the
window, and generation runs on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tessera.errors import InvalidRequestError
from tessera.longctx.config import SegmentConfig
from tessera.outputs import RequestOutput
from tessera.sampling_params import SamplingParams

_SENTINEL = "\u2063tessera-long-context\u2063"


@dataclass
class LongPrompt:
    head: list[int]  # kept in every segment input and in the key context (template start, BOS)
    body: list[int]  # what gets segmented
    question: list[int]  # appended to every segment, ends the key context
    text: str | None = None
    num_template_tokens: int = 0  # the question's last tokens that are chat template, not question
    # The whitespace tokens that end the body and set the question apart (a "text, blank line, question"
    # input's blank line). An excerpt in a key context ends with them too: run straight into the next
    # excerpt or the question ("...his work.Where can one see..."), a small model reads the question as
    # the text's next sentence and goes on with the text.
    separator: list[int] = field(default_factory=list)

    def around(self, body: list[int]) -> list[int]:
        """A model input on `body`: head, body, question."""
        return self.head + body + self.question

    def excerpts(self, spans: list[tuple[int, int]]) -> list[int]:
        """The body's tokens under `spans` (merged), each excerpt set apart by the separator (an excerpt
        that reaches the body's end already ends with it)."""
        out: list[int] = []
        for s, e in merge_spans(spans):
            out += self.body[s:e] + (self.separator if e < len(self.body) else [])
        return out

    def without_question(self, body: list[int]) -> list[int]:
        """A model input on `body` with no question: head, body, and the chat template's closing tokens,
        so what follows still sits where an assistant turn starts."""
        return self.head + body + self.question[len(self.question) - self.num_template_tokens:]

    def scored_positions(self, score_from: float) -> tuple[int, int]:
        """[start, end) within the question: the positions whose next-token entropy scores a segment,
        the question's own tokens from `score_from` of the way in (the template's tokens are left out)."""
        words = len(self.question) - self.num_template_tokens
        return min(int(words * score_from), max(words - 1, 0)), max(words, 1)

    @property
    def token_ids(self) -> list[int]:
        return self.head + self.body + self.question


def split_segments(n: int, size: int, overlap: int, lead: bool = False) -> list[tuple[int, int]]:
    """[start, end) ranges of `size` tokens over [0, n), each sharing `overlap` tokens with the one
    before; together they cover every token, and only the overlaps twice. With `lead` the cut starts
    `overlap` tokens before the input (its first segment is `size - overlap` long), so every token lies
    in the last `size - overlap` tokens of exactly one segment: with overlap = size / 2, in a segment's
    second half, near the question that follows it."""
    if n <= 0:
        return []
    stride = size - overlap
    spans, start = [], -overlap if lead else 0
    while True:
        end = min(start + size, n)
        spans.append((max(start, 0), end))
        if end == n:
            return spans
        start += stride


def sentence_ends(tokenizer, ids: list[int]) -> list[bool]:
    """Per token: whether its text ends a sentence or a line (holds '.', '?', '!' or a newline)."""
    if tokenizer is None:
        return [False] * len(ids)
    return [any(c in t for c in ".?!\n") for t in tokenizer.batch_decode([[i] for i in ids])]


def snap_span(span: tuple[int, int], ends: list[bool], limit: int) -> tuple[int, int]:
    """`span` widened to whole sentences: back to just after the sentence end before it and on to the
    first one at or after its end, each edge only when that end lies within `limit` tokens."""
    s, e = span
    lo = s
    while lo > 0 and s - lo < limit and not ends[lo - 1]:
        lo -= 1
    hi = e
    while hi < len(ends) and hi - e < limit and not ends[hi - 1]:
        hi += 1
    return (lo if lo == 0 or ends[lo - 1] else s), (hi if hi == len(ends) or ends[hi - 1] else e)


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with overlapping or touching spans joined: a token never appears twice in a key context."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def uncopied_gain(lp: LongPrompt, segment: list[int], with_segment: list[float], alone: list[float]) -> float:
    """How much a segment makes the question's words more predictable, counting only the words it cannot
    copy: the mean, over the question positions whose next token the segment does not hold, of the
    next-token entropy after the question alone less that after [segment + question] (entropies per
    question position, as RequestOutput.prompt_entropies). A segment that repeats the question's words
    lets the model copy them with near certainty whether or not it answers (a distractor that shares the
    question's words); a needle worded apart from its question makes the question's other words
    predictable ("kitten" -> "cat", "adopted" -> "took in"). A segment that holds every one of the
    question's tokens is measured on them all."""
    q, words = lp.question, max(len(lp.question) - lp.num_template_tokens, 1)
    held = set(segment)
    kept = [j for j in range(words) if j + 1 >= len(q) or q[j + 1] not in held] or list(range(words))
    return sum(alone[j] - with_segment[j] for j in kept) / len(kept)


def contrast_scores(lp: LongPrompt, entropies: list[list[float]], positions: int | None) -> list[float]:
    """Stage one's "contrast" score of every segment of a prompt (lower: more relevant), from each
    [segment + question]'s next-token entropies over the question (as RequestOutput.prompt_entropies):
    how unusually certain the segment makes the question's words. At each of the question's word
    positions the segments' median entropy is what any text leaves it, and their median absolute
    deviation (+1e-3 nats) how much texts differ there; a segment's drop below the median, in those
    units, is its surprise at that position, and it scores minus the mean of its `positions` largest (None:
    of all). Positions that every segment makes certain (the chat template, a word the question predicts
    itself) surprise for none, so they no longer decide; a needle worded apart from its question still
    makes the question's later words, the name it is about among them, more certain than the haystack."""
    words = max(len(lp.question) - lp.num_template_tokens, 1)
    e = np.asarray([row[:words] for row in entropies], dtype=np.float64)
    median = np.median(e, axis=0)
    spread = np.median(np.abs(e - median), axis=0) + 1e-3
    surprise = -np.sort((median - e) / spread, axis=1)[:, ::-1][:, :positions]
    return [float(v) for v in surprise.mean(axis=1)]


def by_certainty(scores: list[float]) -> list[int]:
    """Segment indices, the most certain (lowest score) first; ties keep the input order."""
    return sorted(range(len(scores)), key=lambda j: (scores[j], j))


def select_segments(spans: list[tuple[int, int]], order: list[int], top_k: int | None,
                    max_body_tokens: int, gap: int = 0) -> list[int]:
    """The first segments of `order` (most relevant first) while their union fits, in input order
    (`gap`: tokens set between excerpts, counted once per excerpt of the union)."""
    chosen: list[int] = []
    for i in order:
        if top_k is not None and len(chosen) == top_k:
            break
        union = merge_spans([spans[j] for j in chosen + [i]])
        if sum(e - s + gap for s, e in union) <= max_body_tokens:
            chosen.append(i)
    return sorted(chosen)


def key_context(lp: LongPrompt, spans: list[tuple[int, int]], chosen: list[int]) -> list[int]:
    return lp.around(lp.excerpts([spans[i] for i in chosen]))


def trailing_space(tokenizer, ids: list[int]) -> list[int]:
    """The tokens at the end of `ids` that are only whitespace."""
    n = len(ids)
    while n > 0 and tokenizer is not None and not tokenizer.decode(ids[n - 1:n]).strip():
        n -= 1
    return ids[n:]


# -- turning inputs into (head, body, question) ----------------------------------------------------

def _take_question(lp: LongPrompt, n: int) -> LongPrompt:
    n = min(n, max(len(lp.body) - 1, 0))
    if n:
        lp.body, lp.question = lp.body[:-n], lp.body[-n:] + lp.question
    return lp


def last_paragraph(tokenizer, text: str, max_tokens: int) -> str | None:
    """The text after `text`'s last blank line, when there is text before it and the paragraph is at
    most `max_tokens` tokens: the question of a "document, blank line, question" input. It is the
    question the segments are scored on unless `SegmentConfig.question` names one."""
    at = text.rfind("\n\n")
    if at < 0 or not text[:at].strip() or not text[at + 2:].strip() or tokenizer is None:
        return None
    tail = text[at + 2:]
    return tail if len(tokenizer.encode(tail, add_special_tokens=False)) <= max_tokens else None


def from_prompt(engine, prompt: str | list[int], cfg: SegmentConfig) -> LongPrompt:
    tok = engine.tokenizer
    question = cfg.question
    if question is None and isinstance(prompt, str):
        question = last_paragraph(tok, prompt, cfg.question_tokens)
    if question is not None:
        if not isinstance(prompt, str):
            raise InvalidRequestError("an explicit question needs text prompts (it is found at the prompt's end)")
        if not prompt.endswith(question) or len(prompt) == len(question):
            raise InvalidRequestError(f"the prompt does not end with the question {question!r}")
        _, body = engine.encode_prompt(prompt[: -len(question)])
        lp = LongPrompt([], body, tok.encode(question, add_special_tokens=False), prompt,
                        separator=trailing_space(tok, body))
    else:
        text, ids = engine.encode_prompt(prompt)
        lp = _take_question(LongPrompt([], ids, [], text), cfg.question_tokens)
    bos = getattr(tok, "bos_token_id", None)
    if bos is not None and lp.body and lp.body[0] == bos:
        lp.head, lp.body = [bos], lp.body[1:]
    return lp


def from_chat(tokenizer, conversation: list[dict], cfg: SegmentConfig, **template_kwargs) -> LongPrompt:
    """The last message must be the user's: its content is the long input (ending with the question)."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequestError("this model has no chat template")
    if not conversation or not isinstance(conversation[-1], dict) or conversation[-1].get("role") != "user":
        raise InvalidRequestError("long-context chat needs a conversation that ends with a user message")
    content = conversation[-1].get("content")
    if not isinstance(content, str) or not content:
        raise InvalidRequestError("the last user message must have non-empty text content")
    question = cfg.question if cfg.question is not None else last_paragraph(tokenizer, content, cfg.question_tokens)
    if question is not None:
        if not content.endswith(question) or len(content) == len(question):
            raise InvalidRequestError(f"the last user message does not end with the question {question!r}")
        content = content[: -len(question)]
    marked = conversation[:-1] + [{**conversation[-1], "content": _SENTINEL}]
    rendered = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False, **template_kwargs)
    if rendered.count(_SENTINEL) != 1:
        raise InvalidRequestError("this model's chat template does not render the user message verbatim")
    head_text, tail_text = rendered.split(_SENTINEL)

    def enc(s: str) -> list[int]:
        return list(tokenizer.encode(s, add_special_tokens=False)) if s else []

    tail = enc(tail_text)
    body = enc(content)
    lp = LongPrompt(enc(head_text), body, enc(question or "") + tail, num_template_tokens=len(tail),
                    separator=trailing_space(tokenizer, body) if question is not None else [])
    return lp if question is not None else _take_question(lp, cfg.question_tokens)


# -- running ---------------------------------------------------------------------------------------

def generate_segments(llm, prompts: list[LongPrompt], params: list[SamplingParams], cfg: SegmentConfig,
                      use_tqdm: bool, scores: list[list[float]] | None = None) -> list[RequestOutput]:
    """`scores`: stage one's scores of these prompts' segments under this cfg's cut and score, as a
    run's `segment_entropies` metrics give them back (a sweep over the later settings, rerank, top_k and
    snapping, reuses them: stage one is nearly all of the time)."""
    engine = llm.engine
    window = engine.max_model_len
    plans = []
    for i, (lp, sp) in enumerate(zip(prompts, params, strict=True)):
        reserve = sp.max_tokens if sp.max_tokens is not None else cfg.reserve_tokens
        fixed = len(lp.head) + len(lp.question) + len(lp.separator)
        room = window - reserve - fixed
        if room < min(cfg.segment_size, max(len(lp.body), 1)):
            raise InvalidRequestError(
                f"prompt {i}: a key context of one {cfg.segment_size}-token segment plus {fixed} tokens of "
                f"template and question and {reserve} answer tokens does not fit the {window}-token window")
        spans = split_segments(len(lp.body), cfg.segment_size, cfg.overlap, cfg.lead)
        # What a segment contributes to an answer: with snap_tokens, itself widened to whole sentences
        # (a small model answers from a sentence cut in half as readily as from a whole one), unless
        # that overflows the room.
        ends = sentence_ends(engine.tokenizer, lp.body) if cfg.snap_tokens and len(spans) > 1 else None
        context = [span if ends is None else snap_span(span, ends, cfg.snap_tokens) for span in spans]
        context = [c if c[1] - c[0] <= room else span for c, span in zip(context, spans, strict=True)]
        plans.append((spans, room, context))

    if scores is not None:  # saved elsewhere: they must be of these prompts' cuts
        want = [len(spans) if len(spans) > 1 else 0 for spans, _, _ in plans]
        if [len(x) for x in scores] != want:
            raise InvalidRequestError(f"saved segment scores have {[len(x) for x in scores]} entries per prompt; "
                                      f"this cut has {want} segments to score")
    entropies = scores if scores is not None else score_segments(llm, prompts, plans, cfg, use_tqdm)
    orders = [by_certainty(e) for e in entropies]
    reranked = _rerank(llm, prompts, plans, orders, cfg, use_tqdm) if cfg.rerank else [({}, {}) for _ in prompts]

    keys, chosen_all = [], []
    for i, (lp, (spans, room, context)) in enumerate(zip(prompts, plans, strict=True)):
        chosen = (select_segments(context, orders[i], cfg.top_k, room, len(lp.separator)) if entropies[i]
                  else list(range(len(spans))))
        chosen_all.append(chosen)
        keys.append(key_context(lp, context, chosen))
    for ids, sp in zip(keys, params, strict=True):
        engine.check_request(ids, sp)
    outs = llm._run([(None, ids, sp) for ids, sp in zip(keys, params, strict=True)], use_tqdm)
    for out, lp, (spans, _, _), chosen, ent, rr in zip(outs, prompts, plans, chosen_all, entropies, reranked,
                                                    strict=True):
        out.prompt = lp.text
        out.metrics.update(long_context="segments", input_tokens=len(lp.token_ids), num_segments=len(spans),
                           selected_segments=chosen, segment_entropies=ent, answer_scores=rr[0],
                           question_gains=rr[1],
                           key_context_tokens=len(out.prompt_token_ids))
    return outs


def score_segments(llm, prompts: list[LongPrompt], plans: list, cfg: SegmentConfig,
                   use_tqdm: bool) -> list[list[float]]:
    """Stage one: per prompt, each segment's score (lower: more relevant; none for a prompt of one)."""
    engine = llm.engine
    # One batch of every [head + segment + question] of every prompt (and with the "gain" score, of
    # every [head + question] alone): scored, never sampled from.
    score_items, owners = [], []
    for i, (lp, (spans, _, _)) in enumerate(zip(prompts, plans, strict=True)):
        if len(spans) < 2:
            continue  # nothing to choose between
        sp = SamplingParams(temperature=0, max_tokens=1, prompt_entropies=len(lp.question))
        for s, e in spans:
            ids = lp.around(lp.body[s:e])
            engine.check_request(ids, sp)
            score_items.append((None, ids, sp))
            owners.append((i, s, e))
        if cfg.score == "gain":
            score_items.append((None, lp.around([]), sp))
            owners.append((i, None, None))
    entropies: list[list[float]] = [[] for _ in prompts]  # per segment: its score, lower is more relevant
    if score_items:
        outs = llm._run(score_items, use_tqdm, desc="scoring segments")
        alone = {i: out.prompt_entropies for (i, s, _), out in zip(owners, outs, strict=True) if s is None}
        raw: list[list[list[float]]] = [[] for _ in prompts]
        for (i, s, e), out in zip(owners, outs, strict=True):
            lp = prompts[i]
            if s is None:
                continue
            if cfg.score == "gain":
                entropies[i].append(-uncopied_gain(lp, lp.body[s:e], out.prompt_entropies, alone[i]))
            elif cfg.score == "contrast":
                raw[i].append(out.prompt_entropies)
            else:
                lo, hi = lp.scored_positions(cfg.score_from)
                scored = sorted(out.prompt_entropies[lo:hi])[: cfg.score_positions]
                entropies[i].append(sum(scored) / len(scored))
        if cfg.score == "contrast":
            entropies = [contrast_scores(lp, r, cfg.score_positions) if r else [] for lp, r in zip(prompts, raw,
                                                                                                   strict=True)]
    return entropies


def _rerank(llm, prompts: list[LongPrompt], plans: list, orders: list[list[int]], cfg: SegmentConfig,
            use_tqdm: bool) -> list[tuple[dict[int, float], dict[int, float]]]:
    """The second look: each of the `rerank` most certain segments (widened to whole sentences) answers
    the question alone (greedy, `rerank_tokens` tokens), and they are reordered, in place at the head of
    `orders`, by how much more certain the segment makes the model of that answer: the answer's mean
    next-token entropy after [segment + question] less that after the question alone. A segment holding
    the answer is copied from with near certainty; an answer that merely echoes the question, or loops,
    is as certain without the segment. An answer the question does not make more certain at all (its
    entropy after [segment + question] less that after the segment alone is not below zero) ignores
    the question: a small model sometimes just goes on copying the segment, which no answer beats on
    certainty, so such candidates go last. Returns, per prompt, each candidate's score (lower: more
    relevant) and the question's gain on its answer (below zero: the question made it more certain)."""
    engine = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=cfg.rerank_tokens)
    cands = []  # (prompt, segment, the segment's span in the body, widened)
    for i, ((_, _, context), order) in enumerate(zip(plans, orders, strict=True)):
        if len(order) >= 2:
            for j in order[: cfg.rerank]:
                s, e = context[j]
                cands.append((i, j, (s, e)))
    scores: list[tuple[dict[int, float], dict[int, float]]] = [({}, {}) for _ in prompts]
    if not cands:
        return scores
    # each candidate answers from a key context of its own: the excerpt, set apart from the question
    inputs = [prompts[i].around(prompts[i].excerpts([span])) for i, _, span in cands]
    for ids in inputs:
        engine.check_request(ids, sp)
    answers = [out.token_ids for out in llm._run([(None, ids, sp) for ids in inputs], use_tqdm,
                                                  desc="answering candidates")]
    # Entropy of predicting each answer token: at the answer's positions shifted back by one. Three
    # inputs per answer: after [segment + question], after the question alone, after the segment alone.
    items = []
    for (i, _, (s, e)), ids, ans in zip(cands, inputs, answers, strict=True):
        ent = SamplingParams(temperature=0, max_tokens=1, prompt_entropies=len(ans) + 1)
        lp = prompts[i]
        items += [(None, ids + ans, ent), (None, lp.around([]) + ans, ent),
                  (None, lp.without_question(lp.body[s:e]) + ans, ent)]
    outs = llm._run(items, use_tqdm, desc="scoring answers")
    for n, (i, j, _) in enumerate(cands):
        both, question_only, segment_only = (sum(outs[3 * n + k].prompt_entropies[:-1]) for k in range(3))
        tokens = max(len(answers[n]), 1)
        scores[i][0][j] = (both - question_only) / tokens
        scores[i][1][j] = (both - segment_only) / tokens
    for i, order in enumerate(orders):
        score, question_gain = scores[i]
        k = len(score)
        order[:k] = sorted(order[:k], key=lambda j: (question_gain[j] >= 0, score[j], j))
    return scores
