"""Stage one's relevance signal on a needle worded apart from its question, among distractors that share
the question's words but not its answer: the "gain" score (entropy drop on the question words a segment
cannot copy) ranks the needle's segment first, by a wide margin; the copy-rewarding "entropy" score
finds a distractor as certain as the needle. Segments are cut exactly (128-token chunks of essay text,
one sentence set into the middle of some) and scored through generate_segments with the default model."""

from __future__ import annotations

from tessera import SamplingParams
from tessera.longctx import SegmentConfig
from tessera.longctx.eval.haystacks import essays_text
from tessera.longctx.segments import LongPrompt, by_certainty, from_chat, generate_segments

SEG = 128
NEEDLE = "Oskar Brandt adopted a grey kitten and called it Biscuit."
QUESTION = "What is the name of the cat that Oskar Brandt took in?"
DISTRACTORS = ["Oskar Brandt has always wanted a cat, but the name of his landlord's cat is not known to anyone.",
               "What is the name of the cat? Oskar Brandt asked, but nobody took the question seriously.",
               "The cat that Oskar Brandt saw in the street had no name, and nobody took it in."]
LAYOUT = ["hay", 0, "hay", "needle", 1, "hay", 2, "hay", "hay", "hay"]  # what each segment holds


def long_prompt(tok) -> LongPrompt:
    system = "You are a helpful assistant. Answer the question at the end of the text in one sentence, using the text."
    shape = from_chat(tok, [{"role": "system", "content": system}, {"role": "user", "content": "x\n\nQ?"}],
                      SegmentConfig())
    template = shape.question[len(shape.question) - shape.num_template_tokens:]
    hay = tok.encode(essays_text()[200000:230000], add_special_tokens=False)
    body, used = [], 0
    for kind in LAYOUT:
        sentence = NEEDLE if kind == "needle" else None if kind == "hay" else DISTRACTORS[kind]
        ids = tok.encode(" " + sentence + " ", add_special_tokens=False) if sentence else []
        filler = hay[used: used + SEG - len(ids)]
        used += SEG
        body += filler[: len(filler) // 2] + ids + filler[len(filler) // 2:]
    question = tok.encode("\n\n" + QUESTION, add_special_tokens=False) + template
    return LongPrompt(shape.head, body, question, num_template_tokens=len(template))


def scores(llm, lp: LongPrompt, score: str) -> list[float]:
    """Stage one's score of every segment (lower: more relevant)."""
    cfg = SegmentConfig(segment_size=SEG, overlap=0, lead=False, score=score, top_k=1, rerank=0, snap_tokens=0)
    out = generate_segments(llm, [lp], [SamplingParams(temperature=0, max_tokens=1)], cfg, use_tqdm=False)[0]
    assert out.metrics["num_segments"] == len(LAYOUT)
    return out.metrics["segment_entropies"]


def test_gain_ranks_a_paraphrased_needle_above_distractors_sharing_the_questions_words(default_llm):
    lp = long_prompt(default_llm.get_tokenizer())
    needle, distractors = LAYOUT.index("needle"), [LAYOUT.index(k) for k in range(3)]
    gain = scores(default_llm, lp, "gain")
    assert by_certainty(gain)[0] == needle, gain
    assert min(gain[d] for d in distractors) - gain[needle] > 0.5, gain  # by a wide margin (nats)
    # The copy-rewarding score cannot tell them apart: a distractor is as certain as the needle.
    entropy = scores(default_llm, lp, "entropy")
    assert min(entropy[d] for d in distractors) < entropy[needle] + 0.05, entropy
