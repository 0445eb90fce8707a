"""The knobs of the two long-context modes, and how a `long_context=` argument becomes one of them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from tessera.config_args import add_config_args, arg, config_kwargs
from tessera.errors import InvalidRequestError

SEGMENT_SCORES = ("contrast", "entropy", "gain")


@dataclass
class SegmentConfig:
    """XL3M: the input is cut into segments, each run as [segment + question]; the k segments on which
    the model is most certain about the question are spliced, in order, into a key context."""

    segment_size: int = arg(128, "tokens of context per segment")
    overlap: int = arg(64, "tokens each segment shares with the one before it", flags=("--segment-overlap",))
    # Start the cut `overlap` tokens before the input: with overlap = segment_size / 2 every token then
    # lies in the second half of some segment. The first tokens otherwise only ever open a segment, as
    # far from the question as can be, and the model's certainty fades with that distance
    # (docs/benchmarks.md, needle at depth 0). Twice the segments at that overlap.
    lead: bool = arg(True, "start the cut a segment overlap before the input (with overlap = size/2, every "
                     "token lies in some segment's second half)", flags=("--lead-segment",))
    # With no explicit question, the input's last paragraph (after its last blank line) is the question when
    # it is at most `question_tokens` tokens; otherwise its last `question_tokens` tokens are.
    question_tokens: int = arg(64, "the input's last tokens taken as the question when none is given and its last "
                               "paragraph is longer")
    question: str | None = arg(None, "an explicit question the input (text, or last user message) ends with")
    top_k: int | None = arg(1, "segments in the key context (0: as many as fit the window)",
                            flags=("--top-k-segments",), zero_is_none=True)
    # Stage one's score of a segment (segments.score_segments), from the next-token entropies over the
    # question's words after [segment + question]:
    # - "contrast" (the default): how unusually certain the segment makes the question's words: its drop
    #   below the segments' median entropy at each word position, over their median absolute deviation,
    #   averaged over its `score_positions` largest (segments.contrast_scores). Positions any text makes
    #   certain (the template, words the question predicts itself) decide nothing. Chosen on the
    #   development set at 32K (docs/benchmarks.md, issue 21): the answer's segment ranked first in 9 of 10
    #   paraphrase samples (entropy: 2), 7 of 10 QA (entropy: 8) and 7 of 10 multi-key (entropy: 5), and
    #   among the rerank's 8 in 26 of 30 (entropy: 19). It still rewards a distractor that repeats the
    #   question's words (tests/longctx/test_relevance.py's hand-built case ranks the needle 3rd).
    # - "entropy": the mean entropy of the `score_positions` most certain question positions from
    #   `score_from` of the way in, copies included; the certainty the template and the question's own
    #   words give after any text decides as much as the segment.
    # - "gain": the entropy drop against the question alone over the words the segment cannot copy
    #   (segments.uncopied_gain); it ranked the needle of a hand-built case first, but no development cell.
    score: str = arg("contrast", "stage-one segment score: contrast (drop below the typical segment's entropy on "
                     "the question's words), entropy (certainty of the question's end, copies included) or gain "
                     "(entropy drop on the words a segment cannot copy)", flags=("--segment-score",))
    # With score="entropy": which question positions are scored: the question's tokens from this
    # fraction of it on. The opening words are predicted from how the segment happens to end, not from
    # whether it answers the question, and the chat template's tokens are as certain after one segment
    # as after any other.
    score_from: float = 0.5
    # With score="contrast" or "entropy": a segment's score is over its `score_positions` most telling
    # positions (None: all of them). A segment that holds the answer lets the model copy one or two of the
    # question's words from it with near certainty; the rest of the question reads alike after any segment,
    # and a mean over all of it drowns that in noise.
    score_positions: int | None = arg(2, "with --segment-score contrast or entropy: score a segment by its N most "
                                      "telling question positions (0: all of them)", zero_is_none=True)
    # The second look: the `rerank` most certain segments each answer the question alone (greedy,
    # `rerank_tokens` tokens) and are reordered by how much the segment lowers the entropy of that answer
    # against the question alone (0: off); answers the question does not make more certain (the model
    # went on copying the segment, question ignored) go last. The question's words tell segments that
    # mention its topic from the one that answers it poorly; the answer does (docs/benchmarks.md, needle).
    rerank: int = arg(8, "segments answered alone and reordered by the answer's certainty (0: off)")
    rerank_tokens: int = 24
    # A segment answers (in the rerank and the key context) widened to whole sentences, by at most this
    # many tokens each way (0: as cut). A segment cut mid-sentence may hold half the answer and answer from
    # the text around it. Together with the lead cut at half-segment overlap it took the needle at 64K and 128K
    # from 40% to 100% (docs/benchmarks.md; alone, on the plain cut, it did no better).
    snap_tokens: int = arg(64, "widen an answering segment to whole sentences by at most N tokens each way (0: off)")
    reserve_tokens: int = 256  # room kept for the answer when max_tokens is None

    def validate(self) -> None:
        if not isinstance(self.segment_size, int) or self.segment_size < 1:
            raise InvalidRequestError(f"segment_size must be a positive integer, got {self.segment_size!r}")
        if not isinstance(self.overlap, int) or not 0 <= self.overlap < self.segment_size:
            raise InvalidRequestError(f"overlap must be in [0, segment_size), got {self.overlap!r}")
        if not isinstance(self.question_tokens, int) or self.question_tokens < 1:
            raise InvalidRequestError(f"question_tokens must be a positive integer, got {self.question_tokens!r}")
        if self.question is not None and (not isinstance(self.question, str) or not self.question):
            raise InvalidRequestError("question must be a non-empty string")
        if not isinstance(self.score_from, int | float) or not 0 <= self.score_from < 1:
            raise InvalidRequestError(f"score_from must be in [0, 1), got {self.score_from!r}")
        if not isinstance(self.rerank, int) or self.rerank < 0:
            raise InvalidRequestError(f"rerank must be an integer >= 0, got {self.rerank!r}")
        if self.score not in SEGMENT_SCORES:
            raise InvalidRequestError(f"score must be one of {', '.join(SEGMENT_SCORES)}, got {self.score!r}")
        if not isinstance(self.lead, bool):
            raise InvalidRequestError(f"lead must be True or False, got {self.lead!r}")
        if not isinstance(self.snap_tokens, int) or self.snap_tokens < 0:
            raise InvalidRequestError(f"snap_tokens must be an integer >= 0, got {self.snap_tokens!r}")
        if not isinstance(self.rerank_tokens, int) or self.rerank_tokens < 1:
            raise InvalidRequestError(f"rerank_tokens must be a positive integer, got {self.rerank_tokens!r}")
        for name in ("top_k", "score_positions"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise InvalidRequestError(f"{name} must be a positive integer or None, got {v!r}")


@dataclass
class SparseConfig:
    """SpeContext-style sparse decoding: a retrieval head picks the top-k KV positions once per step;
    every other layer attends only to those, plus the first `sink_tokens` and the last `recent_tokens`.
    The full KV stays in the slow tier; the selected positions are fetched into a fast working set.

    Of the top-k, up to `observed_tokens` are the positions the prompt's end attended to most while it
    was prefilled (SnapKV's observation window, `observe_window` queries, max over heads and layers,
    widened by a max-pool of `observe_pool`). A question at the end of a long prompt finds its answer
    there at every layer; one shallow retrieval layer per step cannot. The rest of the top-k follows
    the retrieval head step by step."""

    top_k: int = arg(1024, "KV positions each sparse layer attends to, besides sinks and recent",
                     flags=("--sparse-top-k",))
    sink_tokens: int = arg(4, "the first tokens always attended to", flags=("--sparse-sinks",))
    recent_tokens: int = arg(64, "the last tokens always attended to", flags=("--sparse-recent",))
    retrieval_layers: int = arg(2, "the model's first layers, run dense as the retrieval head")
    observed_tokens: int = arg(512, "of the sparse top-k, positions fixed by observing the prompt's end (0: none)",
                               flags=("--sparse-observed",))
    observe_window: int = 32  # the prompt's last tokens whose attention makes the observation
    observe_pool: int = 7  # a picked position brings its neighbours (odd; 1: none)
    # The slow tier: a host store per sequence (page-locked on a GPU) that the working set is fetched
    # from, or (False) the paged KV pool itself. None: offload when the model runs on a GPU.
    offload: bool | None = arg(None, "keep the full KV in a host store and fetch from it (default: on a GPU only)",
                               flags=("--sparse-offload",))
    measure_recall: bool = False  # diagnostics: compare each sparse layer's selection with its dense top-k

    def validate(self) -> None:
        for name in ("top_k", "retrieval_layers", "observe_window", "observe_pool"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise InvalidRequestError(f"{name} must be a positive integer, got {v!r}")
        if self.observe_pool % 2 == 0:
            raise InvalidRequestError(f"observe_pool must be odd, got {self.observe_pool!r}")
        if self.offload is not None and not isinstance(self.offload, bool):
            raise InvalidRequestError(f"offload must be True, False or None, got {self.offload!r}")
        for name in ("sink_tokens", "recent_tokens", "observed_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise InvalidRequestError(f"{name} must be an integer >= 0, got {v!r}")

    @property
    def budget(self) -> int:
        """Working-set slots per sequence: selected + sinks + recent (+1 for the token being decoded)."""
        return self.top_k + self.sink_tokens + self.recent_tokens + 1


LongContextConfig = SegmentConfig | SparseConfig


def resolve_long_context(value) -> LongContextConfig | None:
    """`None`, "segments", "sparse", or a SegmentConfig / SparseConfig."""
    if value is None:
        return None
    if value == "segments":
        value = SegmentConfig()
    elif value == "sparse":
        value = SparseConfig()
    if not isinstance(value, SegmentConfig | SparseConfig):
        raise InvalidRequestError(f"long_context must be 'segments', 'sparse', a SegmentConfig or a SparseConfig, "
                                  f"got {value!r}")
    value.validate()
    return value


def add_long_context_args(parser: argparse.ArgumentParser, choose_mode: bool = True) -> None:
    """The flags of both long-context modes, one per SegmentConfig / SparseConfig field with a help text;
    `--long-context` picks one (callers that run both, like `tessera bench needle`, leave it out)."""
    g = parser.add_argument_group("long context")
    if choose_mode:
        g.add_argument("--long-context", choices=["segments", "sparse"], default=None,
                       help="segments: XL3M segment-wise inference past the window; sparse: sparse KV retrieval")
    add_config_args(g, SegmentConfig)
    add_config_args(g, SparseConfig)


def segment_config(args: argparse.Namespace, **overrides) -> SegmentConfig:
    return SegmentConfig(**{**config_kwargs(args, SegmentConfig), **overrides})


def sparse_config(args: argparse.Namespace, **overrides) -> SparseConfig:
    return SparseConfig(**{**config_kwargs(args, SparseConfig), **overrides})


def long_context_config(args: argparse.Namespace) -> LongContextConfig | None:
    """The mode `--long-context` picks, from its flags (None: plain attention)."""
    if args.long_context == "segments":
        return segment_config(args)
    if args.long_context == "sparse":
        return sparse_config(args)
    return None
