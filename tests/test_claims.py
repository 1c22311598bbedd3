"""Claim checks and the text-free lookup baseline, on constructed rows whose answers are known."""

from __future__ import annotations

import pytest
import torch

from nla.core import claims
from nla.core.lookup import lookup_predict
from nla.core.metrics import fve_nrm, normalize, target_variance
from nla.data.corpus import BUILTIN, iter_documents
from nla.data.splits import derangement
from nla.data.teacher import ExtractiveTeacher

FMT = claims.ExtractiveFormat(context_chars=300)
CONTEXTS = [
    "The for statement is used to iterate over the elements of a sequence. The statement ends with a colon:\n",
    "A class definition defines a class object. The class body runs in a new frame with class",
    "def foo(self):\n    return self.value + other.value",
    "Raises ValueError when the value is negative; the value must be a string",
]


def teacher_text(context: str) -> str:
    return FMT.write(context[-FMT.context_chars :], 16)


def test_the_teachers_own_explanations_are_true_and_well_formed():
    for context in CONTEXTS:
        marks = claims.mark(FMT, teacher_text(context), context)
        assert marks["format_ok"], teacher_text(context)
        assert [c["type"] for c in marks["claims"]] == ["quote", "topic"]
        for c in marks["claims"]:
            assert c["verdict"] == "true" and all(v == 1.0 for v in c["checks"].values()), c


def test_every_teacher_answer_on_the_builtin_corpus_parses():
    teacher = ExtractiveTeacher(tail_chars=16)
    docs = [d.text for d in iter_documents(BUILTIN, max_docs=60)]
    contexts = [d[:n] for d in docs for n in (80, 200, 333) if len(d) > n]
    assert len(contexts) > 100
    for context in contexts:
        text = teacher.explanation(context)
        assert FMT.parse(text).ok, text
        assert claims.mark(FMT, text, context)["claims"][0]["verdict"] == "true", (text, context[-40:])


@pytest.mark.parametrize(
    "text",
    [
        'ends with "class"; class"; about class',  # RL's stutter: the token repeated outside the quote
        'ends with "methods"; methods"; about methods',
        'ends with "x"; about string; about string',  # a claim twice
        'about string; ends with "x"',  # out of order
        'ends with "x"; about',  # an empty topic
        "about string",  # no quote claim
        'ends with "x"; the next token is y',  # a claim the format does not define
        'ends with ""; about string',  # an empty quote: RL's safe guess, never a teacher's answer
    ],
)
def test_broken_formats_are_rejected(text):
    parsed = FMT.parse(text)
    assert not parsed.ok


def test_quote_checks_known_answers():
    ctx = "the cat sat on the mat"
    check = lambda quoted: FMT.check(FMT.claim(f"ends with {claims.quote(quoted)}"), ctx)  # noqa: E731
    assert check("on the mat") == {"exact": 1.0, "words": 1.0, "last_token": 1.0, "char_share": 1.0}
    assert check("on  the mat ") == {"exact": 1.0, "words": 1.0, "last_token": 1.0, "char_share": 1.0}  # runs alike
    # A line break the context does not have is false, though the words are right (RL learned to write one).
    assert check("on the\nmat") == {"exact": 0.0, "words": 1.0, "last_token": 1.0, "char_share": 1.0}
    assert check("\nmat") == {"exact": 0.0, "words": 1.0, "last_token": 1.0, "char_share": 1.0}
    assert FMT.check(FMT.claim('ends with "\nmat"'), "the cat sat on the\n  mat")["exact"] == 1.0
    assert check("matmat") == {"exact": 0.0, "words": 0.0, "last_token": 0.0, "char_share": 0.5}
    assert check("on a mat") == {"exact": 0.0, "words": 0.0, "last_token": 1.0, "char_share": 0.5}
    assert check("a dog") == {"exact": 0.0, "words": 0.0, "last_token": 0.0, "char_share": 0.0}
    assert FMT.check(FMT.claim('ends with "\n"'), "text:\n")["exact"] == 1.0  # the position's token is a line break
    assert FMT.check(FMT.claim('ends with "\n"'), "text:  ")["exact"] == 0.0  # spaces, not a line break
    assert FMT.check(FMT.claim('ends with "\n"'), "text:  ")["words"] == 1.0
    assert FMT.check(FMT.claim('ends with "\n"'), "text:")["exact"] == 0.0
    assert FMT.claim('ends with "say \\"hi\\""').value == 'say "hi"'  # the teacher's escape undone


def test_topic_checks_known_answers():
    ctx = "The value must be a string; a string is immutable. Strings compare by value."
    assert FMT.check(FMT.claim("about string"), ctx) == {"rule": 1.0, "in_context": 1.0}
    assert FMT.check(FMT.claim("about value"), ctx) == {"rule": 0.0, "in_context": 1.0}  # a stop word for the rule
    assert FMT.check(FMT.claim("about callback"), ctx) == {"rule": 0.0, "in_context": 0.0}
    assert FMT.check(FMT.claim("about string"), "x " * 200 + "string")["rule"] == 1.0
    # beyond the teacher's tail
    assert FMT.check(FMT.claim("about string"), "string " + "x " * 200)["in_context"] == 0.0


def test_chance_level_is_the_checks_against_the_deranged_contexts():
    # two endings and two topics, so some deranged pairs agree and the chance level is neither 0 nor 1
    contexts = [
        "the loop ends here with a colon:",
        "the value of the string is a colon:",
        "a class body holds a class method",
        "the string method returns a class method",
    ] * 3
    texts = [teacher_text(c) for c in contexts]
    others = derangement(len(contexts), 5).tolist()
    s = claims.summarize(FMT, texts, contexts, others)
    assert (
        s["types"]["quote"]["accuracy"] == 1.0 and s["types"]["topic"]["accuracy"] == 1.0 and s["mean_accuracy"] == 1.0
    )
    for kind, check in (("quote", "exact"), ("topic", "rule"), ("topic", "in_context")):
        claim = [FMT.parse(t).claims[["quote", "topic"].index(kind)] for t in texts]
        by_hand = sum(FMT.check(c, contexts[j])[check] for c, j in zip(claim, others)) / len(texts)
        assert s["types"][kind]["checks"][check]["chance"] == pytest.approx(by_hand)
        assert 0 < by_hand < 1 or check == "in_context"
    assert s["format_break_rate"] == 0.0 and s["malformed_rate"] == 0.0


def test_collapse_is_flagged_and_the_teachers_own_concentration_excuses_it():
    contexts = [f"the {w} and the {w}: item {i}" for i, w in enumerate(["python", "lists", "loops", "classes"] * 5)]
    collapsed = [f'ends with "{c[-6:]}"; about string' for c in contexts]
    s = claims.summarize(FMT, collapsed, contexts, derangement(len(contexts), 0).tolist())
    assert s["types"]["topic"]["top_value"] == "string" and s["types"]["topic"]["top_share"] == 1.0
    assert s["types"]["topic"]["distinct"] == 1 and s["types"]["quote"]["distinct"] == 20
    warnings = claims.collapse_warnings(s)
    assert any("100% of topic claims say 'string'" in w for w in warnings), warnings
    assert not claims.collapse_warnings(s, reference=s)  # the teacher's labels that concentrated: not a collapse
    varied = [teacher_text(c) for c in contexts]
    assert not claims.collapse_warnings(claims.summarize(FMT, varied, contexts))
    same = claims.summarize(FMT, ['ends with "x"'] * 10, ["x"] * 10)
    assert same["repeated_verbatim"] == 1.0 and any("word for word" in w for w in claims.collapse_warnings(same))
    stutter = claims.summarize(
        FMT, ['ends with "class"; class"; about class'] * 3 + ['ends with "x"'], ["class"] * 3 + ["x"]
    )
    assert stutter["format_break_rate"] == 0.75 and any(
        "break the extractive format" in w for w in claims.collapse_warnings(stutter)
    )


def test_unchecked_claims_are_never_reported_true():
    free = claims.FreeFormat()
    s = claims.summarize(free, ["Python code. A loop over items", None], ["for x in items:", "y"], [1, 0])
    assert s["unchecked"] == ["phrase"] and s["mean_accuracy"] is None and s["types"]["phrase"]["accuracy"] is None
    marks = claims.mark(free, "Python code. A loop over items", "for x in items:")
    assert [c["verdict"] for c in marks["claims"]] == ["unchecked", "unchecked"]
    assert claims.marked_text(marks) == "? Python code. · ? A loop over items"
    assert claims.format_for({"provider": "openai"}).name == "free"
    assert claims.format_for({"provider": "extractive", "context_chars": 300}).context_chars == 300


def test_flat_keys():
    contexts = CONTEXTS
    s = claims.summarize(FMT, [teacher_text(c) for c in contexts], contexts, derangement(4, 0).tolist())
    flat = claims.flat(s, "eval/claims/")
    for key in (
        "eval/claims/quote/accuracy",
        "eval/claims/quote/chance",
        "eval/claims/quote/exact",
        "eval/claims/quote/char_share_chance",
        "eval/claims/topic/in_context",
        "eval/claims/topic/top_share",
        "eval/claims/mean_accuracy",
        "eval/claims/format_break_rate",
        "eval/claims/repeated_verbatim",
    ):
        assert key in flat, key


# ---------------------------------------------------------------- the lookup baseline


def _rows(n: int, vocab: int, g: torch.Generator) -> list[list[int]]:
    return torch.randint(0, vocab, (n, 3), generator=g).tolist()


def test_lookup_reaches_fve_one_when_vectors_depend_only_on_the_last_token():
    g = torch.Generator().manual_seed(0)
    d, vocab = 32, 6
    directions = torch.randn(vocab, d, generator=g)
    train, test = _rows(300, vocab, g), _rows(60, vocab, g)

    def vectors(rows):  # the last token's direction at a random positive scale
        return torch.stack([directions[r[-1]] * (1 + torch.rand((), generator=g) * 5) for r in rows])

    train_v, test_v = vectors(train), vectors(test)
    scale = d**0.5
    for order in (1, 2):
        pred, used = lookup_predict(train, train_v, test, order, scale)
        assert fve_nrm(pred, test_v, scale, target_variance(test_v, scale)) == pytest.approx(1.0, abs=1e-5)
        assert min(used) >= 1


def test_lookup_is_the_constant_floor_when_vectors_do_not_depend_on_the_token():
    g = torch.Generator().manual_seed(1)
    d, vocab = 32, 4
    train, test = _rows(4000, vocab, g), _rows(400, vocab, g)
    mean = torch.randn(d, generator=g) * 2  # activations share a direction: the floor is what predicting it scores
    train_v, test_v = mean + torch.randn(len(train), d, generator=g), mean + torch.randn(len(test), d, generator=g)
    scale, var = d**0.5, target_variance(test_v, d**0.5)
    floor = fve_nrm(normalize(train_v, scale).mean(0, keepdim=True).expand_as(test_v), test_v, scale, var)
    pred, _ = lookup_predict(train, train_v, test, 1, scale)
    assert fve_nrm(pred, test_v, scale, var) == pytest.approx(floor, abs=0.02)


def test_lookup_backs_off_to_fewer_tokens_then_to_the_mean():
    train = [[1, 2], [3, 2], [5, 6]]
    vecs = torch.eye(3)
    pred, used = lookup_predict(train, vecs, [[1, 2], [9, 2], [9, 9]], 2, 1.0)
    assert used == [2, 1, 0]
    assert torch.allclose(pred[0], torch.tensor([1.0, 0, 0]))  # the bigram (1, 2)
    assert torch.allclose(pred[1], normalize(torch.tensor([[1.0, 1, 0]]), 1.0)[0])  # token 2: rows 0 and 1
    assert torch.allclose(pred[2], normalize(torch.ones(1, 3), 1.0)[0])  # unseen: the mean of all rows
    with pytest.raises(ValueError):
        lookup_predict(train, vecs, [[1]], 0, 1.0)


# ---------------------------------------------------------------- the one parser of an AV's answer


def test_read_answer_fails_broken_formats_and_keeps_the_text():
    tagged = lambda e: f"<explanation>\n{e}\n</explanation>"  # noqa: E731
    assert claims.read_answer(FMT, tagged('ends with "class"; about class')) == ('ends with "class"; about class', True)
    # RL's stutter: a failure, its text kept for the report
    assert claims.read_answer(FMT, tagged('ends with "class"; class"; about class')) == (
        'ends with "class"; class"; about class',
        False,
    )
    assert claims.read_answer(FMT, 'ends with "x"') == (None, False)  # no tags
    free = claims.FreeFormat()
    assert claims.read_answer(free, tagged('ends with "class"; class"; about class'))[1]  # free text: the tags only
    for context in CONTEXTS:
        text = "<explanation>" + teacher_text(context) + "</explanation>"
        assert claims.read_answer(FMT, text)[1]


def test_the_av_sidecar_names_the_format_it_is_held_to():
    record = claims.format_record({"teacher": {"provider": "extractive"}, "provenance": {"teacher_context_chars": 300}})
    fmt = claims.trained_format({"training": {"explanation_format": record}})
    assert fmt.name == "extractive" and fmt.context_chars == 300
    assert claims.trained_format({"training": {}}).name == "free"  # an AV saved before the record: tags only
    assert claims.trained_format({}).name == "free"


def test_a_format_without_the_topic_writes_and_accepts_only_the_quote():
    from nla.core.config import ConfigError, TeacherConfig

    quote_only = claims.ExtractiveFormat(300, ("quote",))
    context = CONTEXTS[1]
    text = quote_only.write(context, 16)
    assert text == 'ends with "frame with class"' and quote_only.parse(text).ok
    assert not quote_only.parse('ends with "x"; about class').ok  # a claim this format does not write is malformed
    assert FMT.parse('ends with "x"').ok  # the topic is optional where the context has no topic word
    teacher = ExtractiveTeacher(tail_chars=16, claims=("quote",))
    assert teacher.identity.endswith(":claims=quote") and ExtractiveTeacher().identity == "extractive:v4:tail16"
    record = claims.format_record({"teacher": {"provider": "extractive", "claims": ["quote"]}})
    assert claims.format_for(record).claim_types == ("quote",)
    assert claims.format_for({"provider": "extractive"}).claim_types == ("quote", "topic")  # a record from before
    for bad in ("topic", "next,topic", "quote,quote", "quote,colour", ""):
        with pytest.raises(ConfigError, match="teacher_claims"):
            TeacherConfig(teacher_claims=bad)


def test_truth_share_is_the_share_of_claims_checked_true():
    fmt = claims.ExtractiveFormat()
    context = "The parser returns the header value.\nThe header value"
    topic = claims.topic_word(context)
    assert topic == "header"
    assert claims.truth_share(fmt, f'ends with "header value"; about {topic}', context) == 1.0
    assert claims.truth_share(fmt, 'ends with "header value"; about string', context) == 0.5
    assert claims.truth_share(fmt, 'ends with "\n"; about string', context) == 0.0  # the whitespace hedge is false
    assert claims.truth_share(fmt, 'ends with "value"; value"; about value', context) == 0.5  # malformed: not true
    assert claims.truth_share(fmt, None, context) == 0.0
    assert claims.truth_share(claims.FreeFormat(), "about headers", context) == 0.0  # unchecked is never true


def test_a_true_quote_can_be_paid_by_its_length():
    """--rl_claim_quote_chars N: a true quote counts len / N (at most 1), a false one 0, other claims 1."""
    fmt = claims.ExtractiveFormat(claim_types=("quote",))
    context = "The parser returns the header value.\nThe header value"
    share = lambda text, n: claims.truth_share(fmt, text, context, quote_chars=n)  # noqa: E731
    assert share('ends with "value"', 16) == 5 / 16 and share('ends with "value"', 0) == 1.0
    assert share('ends with "header value"', 16) == 12 / 16 > share('ends with "value"', 16)
    assert share('ends with "The header value"', 16) == 1.0  # 16 characters: in full
    assert share('ends with "\nThe header value"', 16) == 1.0  # longer: still at most 1
    assert share('ends with "the header value"', 16) == 0.0  # one character wrong: the whole quote is false
    topical = claims.ExtractiveFormat()
    assert claims.truth_share(topical, 'ends with "value"; about header', context, quote_chars=10) == (0.5 + 1) / 2


def test_the_next_token_claim_is_checked_against_the_rows_recorded_prediction():
    fmt = claims.ExtractiveFormat(claim_types=("quote", "next"))
    row = claims.Row("The value of x", " is")
    text = fmt.with_facts(fmt.write(row.context, 16), row)
    assert text == 'ends with "The value of x"; predicts " is"' and fmt.parse(text).ok
    assert [c["verdict"] for c in claims.mark(fmt, text, row)["claims"]] == ["true", "true"]
    assert fmt.check(fmt.claim('predicts "Is"'), row) == {"exact": 0.0, "words": 1.0}
    assert fmt.check(fmt.claim('predicts "\n"'), claims.Row("a", "\n\n"))["exact"] == 1.0  # a line break is one
    assert fmt.check(fmt.claim('predicts " "'), claims.Row("a", "\n"))["exact"] == 0.0
    # Without a recorded prediction (new text) the claim is unchecked, never true or false.
    assert claims.mark(fmt, text, row.context)["claims"][1]["verdict"] == "unchecked"
    assert claims.truth_share(fmt, text, row.context) == 0.5
    # Order and repetition are the grammar's: the prediction after the quote, once.
    assert not fmt.parse('predicts " is"; ends with "x"').ok
    assert not fmt.parse('predicts " is"').ok  # the quote is always there
    assert not fmt.parse('ends with "x"; predicts " is"; predicts " is"').ok
    assert not claims.ExtractiveFormat(claim_types=("quote",)).parse(text).ok  # a format without it rejects it
    assert fmt.with_facts('ends with "x"', row.context) == 'ends with "x"'  # no recorded fact: no claim


def test_next_token_accuracy_and_chance_use_each_rows_own_prediction():
    fmt = claims.ExtractiveFormat(claim_types=("quote", "next"))
    rows = [claims.Row("a b", " c"), claims.Row("d e", " f"), claims.Row("g h", " i"), claims.Row("j k", None)]
    said = [
        'ends with "b"; predicts " c"',
        'ends with "e"; predicts " f"',
        'ends with "h"; predicts " x"',
        'ends with "k"; predicts " c"',
    ]
    s = claims.summarize(fmt, said, rows, [1, 2, 0, 0])
    nxt = s["types"]["next"]
    assert nxt["n"] == 4 and nxt["accuracy"] == pytest.approx(2 / 3)  # the unrecorded row is left out
    assert nxt["chance"] == pytest.approx(0.0)  # " c" vs row 1's " f", " f" vs " i", " x" vs " c"
    assert s["types"]["quote"]["accuracy"] == 1.0


def test_a_claim_listed_before_the_quote_is_written_and_required_before_it():
    """--teacher_claims next,quote: the prediction first (the AV writes it before the quote, the AR
    still reads the quote last); the grammar holds the AV to that order."""
    fmt = claims.ExtractiveFormat(claim_types=("next", "quote"))
    row = claims.Row("The value of x", " is")
    text = fmt.with_facts(fmt.write(row.context, 16), row)
    assert text == 'predicts " is"; ends with "The value of x"' and fmt.parse(text).ok
    assert [c["verdict"] for c in claims.mark(fmt, text, row)["claims"]] == ["true", "true"]
    assert not fmt.parse('ends with "x"; predicts " is"').ok  # the other order breaks this format
    assert fmt.parse('ends with "x"').ok  # a row without a recorded prediction: the quote alone
    assert fmt.with_facts('ends with "x"', row.context) == 'ends with "x"'
    # With the topic in between, each claim goes to its place, and a quote holding ';' stays whole.
    three = claims.ExtractiveFormat(claim_types=("topic", "next", "quote"))
    context = "header; value and header value; a"
    written = three.with_facts(three.write(context, 16), claims.Row(context, "\n"))
    assert written == 'about header; predicts "\n"; ends with " header value; a"' and three.parse(written).ok
    assert ExtractiveTeacher(claims=("next", "quote")).identity.endswith(":claims=next,quote")
