"""What an explanation claims, and whether each claim is true of the row's context.

An explanation is a list of claims, split at the format's own separators (`split_claims`). Each
teacher format declares its grammar and a checker per claim type (`ExplanationFormat`):

- `extractive` (the model-free teacher): `ends with "LAST CHARACTERS"; about TOPIC`. Exactly one
  quote claim and each further claim at most once, in the format's order (`--teacher_claims`; the
  quote first unless the list puts another claim before it); anything else is a malformed claim and breaks
  the format (RL's `ends with "class"; class"; about class` does, and so does an empty quote,
  `ends with ""`, which the teacher never writes). The quote is checked four ways
  (`exact`: the context ends with it, each whitespace run read as a line break or a space, trailing
  whitespace aside; `words`: the same with all whitespace runs alike, so `"\nand"` after `" and"`
  passes; `last_token`:
  its last word or symbol is the context's; `char_share`: the share of its characters, from the
  end, that match the context's end), the topic two ways (`rule`: the word the teacher's rule
  picks for this context; `in_context`: the word occurs in the context).
- `free` (real teachers, `--teacher local|openai`): any phrases; no rule can check them, so each
  is reported as unchecked unless an LLM judge reads them (`nla eval --judge openai`).

A claim type with no checker is reported as unchecked, never as true. Every accuracy comes with
its chance level: the same check against another row's context (a derangement), so "59% exact"
is read against what an explanation of some other position scores. Pure functions: no model,
no I/O; `summarize` is what eval reports and RL's held-out check logs.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nla.core import templates

MALFORMED = "malformed"


# ---------------------------------------------------------------- splitting


def split_claims(text: str) -> list[str]:
    """An explanation's phrases: split at ';' and at sentence ends ('.', '!', '?' before a space),
    never inside a double-quoted span (a quoted ending may hold any of them; `\\"` stays inside)."""
    claims, start, quoted, escaped = [], 0, False, False
    for i, ch in enumerate(text):
        if quoted:
            escaped, quoted = (not escaped and ch == "\\"), quoted and not (ch == '"' and not escaped)
            continue
        if ch == '"':
            quoted = True
        elif ch == ";" or (ch in ".!?" and text[i + 1 : i + 2].isspace()):
            claims.append(text[start : i + (ch != ";")])
            start = i + 1
    claims.append(text[start:])
    return [c.strip() for c in claims if c.strip()]


# ---------------------------------------------------------------- the extractive format's rules

STOP_WORDS = frozenset(
    """about above after again against because before being below between could doing during
every further having other should their there these those through under until where which while would itself
value values given""".split()
)


def quote(text: str) -> str:
    """`text` in double quotes, exactly as written: line breaks, tabs and spaces stay themselves (they
    are often the position's own token, and the AV copies them as the tokens the model read);
    only a double quote is escaped (`\\"`), so the quoted span has one end.

    JSON escapes (a line break as the two characters `\\n`) were replaced after the demo's SFT AV
    looped on `\\n\\n\\n...` up to the token cap in 10 of its 11 failures; quoted as written, the SFT
    AV's failures halved in both embedded configs, while held-out FVE moved within the run-to-run
    spread (+0.06 on the demo, -0.04 on the long config; docs/benchmarks.md)."""
    return '"' + text.replace('"', '\\"') + '"'


def _word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def text_tail(context: str, n_chars: int) -> str:
    """The context's last `n_chars` characters, starting at a word boundary where one is near."""
    if len(context) <= n_chars:
        return context
    tail = context[-n_chars:]
    if _word_char(context[-n_chars - 1]) and _word_char(tail[0]):  # the cut fell inside a word: drop its end
        space = re.search(r"\s", tail)
        if space is not None and space.start() < n_chars // 2:
            tail = tail[space.start() + 1 :]
    return tail


def words(text: str) -> list[str]:
    """Identifier-like words, lower-cased (what the topic rule counts)."""
    return [w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)]


def topic_word(context: str) -> str | None:
    """The context's most frequent word of 5+ letters (stop words aside), or None."""
    long_words = [w for w in words(context) if len(w) >= 5 and w not in STOP_WORDS and not w.startswith("_")]
    return collections.Counter(long_words).most_common(1)[0][0] if long_words else None


def line_breaks(text: str) -> str:
    """Each whitespace run as what it reads as: a line break if it holds one, else one space."""
    return re.sub(r"\s+", lambda m: "\n" if "\n" in m.group() else " ", text)


def squash(text: str) -> str:
    """Whitespace runs collapsed to one space, the ends trimmed: how quotes and contexts are compared."""
    return " ".join(text.split())


def last_lexeme(text: str) -> str | None:
    """The last word (letters, digits, `_`) or symbol of `text`, None if it has neither."""
    found = re.findall(r"\w+|[^\w\s]", text)
    return found[-1] if found else None


def common_suffix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


# ---------------------------------------------------------------- claims and formats


@dataclass(frozen=True)
class Row:
    """What a claim is checked against: the row's context and the facts about the position that the
    text alone does not give (`next_token`: the target model's own most likely next token there,
    recorded by datagen). Every function here takes a plain context string too: no facts."""

    context: str
    next_token: str | None = None


def as_row(context: str | Row) -> Row:
    return context if isinstance(context, Row) else Row(context or "")


def context_text(context: str | Row) -> str:
    return as_row(context).context


@dataclass(frozen=True)
class Claim:
    kind: str  # a claim type of the format, or MALFORMED
    value: str  # what it asserts (the quoted text, the topic word); the claim's own text when malformed
    text: str  # the claim as written


@dataclass
class Parsed:
    claims: list[Claim]
    ok: bool  # the explanation follows its format's grammar


class ExplanationFormat(Protocol):
    name: str
    claim_types: tuple[str, ...]  # in the order the grammar wants them
    checked_types: tuple[str, ...]  # those with a checker; the others are reported as unchecked
    primary: dict[str, str]  # claim type -> the check that counts as "the claim is true"

    def parse(self, explanation: str) -> Parsed: ...

    def check(self, claim: Claim, context: str | Row) -> dict[str, float]: ...  # check -> score in [0, 1]


_QUOTE = re.compile(r'ends with "(.*)"', re.S)
_TOPIC = re.compile(r"about (\S.*)", re.S)
_NEXT = re.compile(r'predicts "(.*)"', re.S)


EXTRACTIVE_CLAIMS = ("quote", "topic", "next")  # what the extractive format can say (in any order a list gives)
LEGACY_CLAIMS = ("quote", "topic")  # what a format record without a claim list means (it predates the choice)


@dataclass
class ExtractiveFormat:
    """`ends with "…"; about TOPIC; predicts "…"` (nla.data.teacher.ExtractiveTeacher writes the quote
    and the topic, datagen the prediction: it ran the model): exactly one quote claim and each further
    claim of `claim_types` at most once, all in that order (the topic is left out where the context
    has no topic word, the prediction where the row records none). The order is the list's:
    `("next", "quote")` writes `predicts "…"; ends with "…"`, the prediction first. `context_chars`:
    how much context the teacher read (its topic rule saw only that tail, so the checks do too).
    Without a claim list: quote and topic, what the format said before the list was a choice
    (`--teacher_claims`, whose default is the quote alone)."""

    context_chars: int = 600
    claim_types: tuple[str, ...] = LEGACY_CLAIMS
    name: str = "extractive"
    primary: dict[str, str] = field(default_factory=lambda: {"quote": "exact", "topic": "rule", "next": "exact"})

    def __post_init__(self) -> None:
        self.claim_types = tuple(self.claim_types)
        unknown = [c for c in self.claim_types if c not in EXTRACTIVE_CLAIMS]
        repeated = len(set(self.claim_types)) < len(self.claim_types)
        if "quote" not in self.claim_types or unknown or repeated:
            raise ValueError(
                f"extractive claims {list(self.claim_types)}: 'quote' and any of "
                f"{list(EXTRACTIVE_CLAIMS[1:])}, each once, in the order they are written."
            )

    @property
    def checked_types(self) -> tuple[str, ...]:
        return self.claim_types

    def write(self, context: str, quote_chars: int) -> str:
        """The teacher's explanation of `context` (already cut to what the teacher reads): the claims
        read from the text (the fact claims are added by `with_facts`)."""
        tail = text_tail(context, quote_chars)
        topic = topic_word(context) if "topic" in self.claim_types else None
        written = {"quote": f"ends with {quote(tail)}" if tail else "an empty text"}
        if topic:
            written["topic"] = f"about {topic}"
        return "; ".join(written[k] for k in self.claim_types if k in written)

    def with_facts(self, explanation: str, row: str | Row) -> str:
        """`explanation` with the claims this format makes from the row's facts (`predicts "X"`, the
        model's own next token) put in their place in the format's order, where the row records them."""
        row = as_row(row)
        if "next" not in self.claim_types or row.next_token is None:
            return explanation
        claims = split_claims(explanation)
        before = self.claim_types[: self.claim_types.index("next")]  # the kinds written ahead of it
        at = sum(self.claim(c).kind in before for c in claims)
        claims.insert(at, f"predicts {quote(row.next_token)}")
        return "; ".join(claims)

    def claim(self, text: str) -> Claim:
        """One claim of this format, or MALFORMED (a claim type the format does not write is malformed too)."""
        if text == "an empty text":
            return Claim("quote", "", text)
        match = _QUOTE.fullmatch(text)
        if match and match.group(1):  # the teacher never quotes nothing: `ends with ""` says nothing true
            return Claim("quote", match.group(1).replace('\\"', '"'), text)
        match = _TOPIC.fullmatch(text)
        if "topic" in self.claim_types and match and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", match.group(1).strip()):
            return Claim("topic", match.group(1).strip(), text)
        match = _NEXT.fullmatch(text)
        if "next" in self.claim_types and match and match.group(1):
            return Claim("next", match.group(1).replace('\\"', '"'), text)
        return Claim(MALFORMED, text, text)

    def parse(self, explanation: str) -> Parsed:
        claims = [self.claim(c) for c in split_claims(explanation)]
        kinds = [c.kind for c in claims]
        in_order = kinds == [k for k in self.claim_types if k in kinds]  # known kinds, in the format's order
        return Parsed(claims, "quote" in kinds and in_order and len(set(kinds)) == len(kinds))

    def check(self, claim: Claim, context: str | Row) -> dict[str, float]:
        row = as_row(context)
        context = row.context[-self.context_chars :]
        if claim.kind == "next":  # the model's own top-1 next token: unchecked where the row does not record it
            if row.next_token is None:
                return {}
            said, real = claim.value, row.next_token
            same = said.strip() == real.strip() and (said.strip() != "" or line_breaks(said) == line_breaks(real))
            return {"exact": float(same), "words": float(said.strip().lower() == real.strip().lower())}
        if claim.kind == "quote":
            said, real = squash(claim.value), squash(context)
            if not said:  # a quote of whitespace only (or "an empty text"): true when the context ends that way
                if not claim.value:
                    exact = blank = float(not context.strip())
                else:
                    exact = float(
                        context.endswith(claim.value) or line_breaks(context).endswith(line_breaks(claim.value))
                    )
                    blank = float(context[-1:].isspace())
                return {"exact": exact, "words": blank, "last_token": blank, "char_share": blank}
            last = last_lexeme(said)
            exact = (
                context.rstrip().endswith(claim.value.rstrip())  # a literal copy (the teacher's) is exact
                or line_breaks(context).rstrip().endswith(line_breaks(claim.value).rstrip())
            )
            return {
                "exact": float(exact),
                "words": float(real.endswith(said)),
                "last_token": float(last is not None and last == last_lexeme(real)),
                "char_share": common_suffix(said, real) / len(said),
            }
        if claim.kind == "topic":
            word = claim.value.lower()
            return {"rule": float(word == topic_word(context)), "in_context": float(word in set(words(context)))}
        return {}


@dataclass
class FreeFormat:
    """Free text from a real teacher: its phrases are its claims, and no rule checks them."""

    name: str = "free"
    claim_types: tuple[str, ...] = ("phrase",)
    checked_types: tuple[str, ...] = ()
    primary: dict[str, str] = field(default_factory=dict)

    def parse(self, explanation: str) -> Parsed:
        return Parsed([Claim("phrase", c, c) for c in split_claims(explanation)], True)

    def check(self, claim: Claim, context: str | Row) -> dict[str, float]:
        return {}


def format_record(dataset_extra: dict[str, Any]) -> dict[str, Any]:
    """What a model sidecar keeps of its dataset's format (`training.explanation_format`), so an AV
    explaining new text (`--texts`) still has its claims checked: {"provider", "claims", "context_chars"}."""
    teacher = dataset_extra.get("teacher") or {}
    return {
        "provider": teacher.get("provider"),
        "claims": teacher.get("claims"),
        "context_chars": (dataset_extra.get("provenance") or {}).get("teacher_context_chars"),
    }


def format_for(record: dict[str, Any] | None) -> ExplanationFormat:
    """The format of a `format_record` (`{"provider": "extractive", "claims": [...], "context_chars": N}`;
    a record without claims predates the choice: quote and topic); any other provider is free text."""
    record = record or {}
    if record.get("provider") == "extractive":
        return ExtractiveFormat(record.get("context_chars") or 600, tuple(record.get("claims") or LEGACY_CLAIMS))
    return FreeFormat()


def trained_format(model_meta_extra: dict[str, Any]) -> ExplanationFormat:
    """The format an AV was trained to write (its sidecar's `training.explanation_format`); an AV
    saved without that record is held to the tags only (free text)."""
    return format_for((model_meta_extra.get("training") or {}).get("explanation_format"))


def read_answer(fmt: ExplanationFormat, text: str) -> tuple[str | None, bool]:
    """The one parser of an AV's answer (SFT samples, RL rollouts, eval, verbalize): -> (the
    explanation between the tags or None, whether it is usable: tags present and the explanation
    follows `fmt`'s grammar). A broken format is a failure, as missing tags are: RL gives it the
    failure reward, and no stuttered answer counts as a success."""
    explanation = templates.extract_explanation(text)
    return explanation, explanation is not None and fmt.parse(explanation).ok


# ---------------------------------------------------------------- marks and summaries


def mark(fmt: ExplanationFormat, explanation: str | None, context: str | Row) -> dict[str, Any]:
    """One row's claims with their checks: {"format_ok", "claims": [{type, value, text, checks,
    verdict}]}; verdict is "true" / "false" (the type's primary check), "unchecked" or "malformed"."""
    if explanation is None:
        return {"format_ok": False, "claims": []}
    parsed = fmt.parse(explanation)
    out = []
    for c in parsed.claims:
        checks = fmt.check(c, context) if c.kind in fmt.checked_types else {}
        if c.kind == MALFORMED:
            verdict = MALFORMED
        elif not checks:
            verdict = "unchecked"
        else:
            verdict = "true" if checks[fmt.primary[c.kind]] >= 1.0 else "false"
        out.append({"type": c.kind, "value": c.value, "text": c.text, "checks": checks, "verdict": verdict})
    return {"format_ok": parsed.ok, "claims": out}


def truth_share(fmt: ExplanationFormat, explanation: str | None, context: str | Row, quote_chars: int = 0) -> float:
    """The share of an explanation's claims that its format's checks find true of `context` (a
    malformed or unchecked claim counts as not true); 0 for no explanation or no claims. RL's
    grounded claim term (`--rl_claim_reward`) pays this. With `quote_chars` > 0 a true quote counts
    its length over that many characters (at most 1), so a longer true quote is worth more than the
    token alone (`--rl_claim_quote_chars`)."""
    if explanation is None:
        return 0.0

    def worth(c: dict[str, Any]) -> float:
        if c["verdict"] != "true":
            return 0.0
        return min(1.0, len(c["value"]) / quote_chars) if quote_chars and c["type"] == "quote" else 1.0

    marks = mark(fmt, explanation, context)["claims"]
    return sum(map(worth, marks)) / len(marks) if marks else 0.0


SYMBOLS = {"true": "✓", "false": "✗", "unchecked": "?", MALFORMED: "!"}


def marked_text(marks: dict[str, Any]) -> str:
    """`✓ ends with "x" · ✗ about string` (✓ true, ✗ false, ? unchecked, ! malformed): RL's samples table."""
    return " · ".join(f"{SYMBOLS[c['verdict']]} {c['text']}" for c in marks["claims"]) or "<failed>"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(
    fmt: ExplanationFormat,
    explanations: list[str | None],
    contexts: list[str | Row],
    others: Iterable[int] | None = None,
) -> dict[str, Any]:
    """Claim accuracy per claim type and check (with chance: the same claims checked against
    `contexts[others[i]]`, a derangement; None skips it), and the collapse signals: per type the
    distinct values and the most common one's share; the share of explanations repeated
    verbatim; malformed claims and format breaks. Failed explanations (None) make no claims."""
    others = list(others) if others is not None else None
    said = [e for e in explanations if e is not None]
    parsed = [fmt.parse(e) if e is not None else None for e in explanations]
    claims = [c for p in parsed if p is not None for c in p.claims]
    counts = collections.Counter(said)
    out: dict[str, Any] = {
        "format": fmt.name,
        "n": len(explanations),
        "n_explained": len(said),
        "n_claims": len(claims),
        "format_break_rate": _mean([float(not p.ok) for p in parsed if p is not None]),
        "malformed_rate": _mean([float(c.kind == MALFORMED) for c in claims]),
        "repeated_verbatim": _mean([float(counts[e] > 1) for e in said]),
        "types": {},
    }
    for kind in fmt.claim_types:
        of_kind = [(i, c) for i, p in enumerate(parsed) if p is not None for c in p.claims if c.kind == kind]
        values = collections.Counter(squash(c.value).lower() for _, c in of_kind)
        top = values.most_common(1)[0] if values else (None, 0)
        entry: dict[str, Any] = {
            "n": len(of_kind),
            "present": _mean([float(any(c.kind == kind for c in p.claims)) for p in parsed if p is not None]),
            "distinct": len(values),
            "top_value": top[0],
            "top_share": top[1] / len(of_kind) if of_kind else None,
            "checked": kind in fmt.checked_types,
            "accuracy": None,
            "chance": None,
        }
        # a claim its row has no fact for (a prediction on new text) is unchecked: left out of both means
        real = [(i, c, fmt.check(c, contexts[i])) for i, c in of_kind] if entry["checked"] else []
        real = [(i, c, r) for i, c, r in real if r]
        if real:
            chance = [fmt.check(c, contexts[others[i]]) for i, c, _ in real] if others is not None else None
            entry["checks"] = {
                name: {
                    "accuracy": _mean([r[name] for _, _, r in real]),
                    "chance": _mean([r[name] for r in chance if r]) if chance is not None else None,
                }
                for name in real[0][2]
            }
            first = entry["checks"][fmt.primary[kind]]
            entry["accuracy"], entry["chance"] = first["accuracy"], first["chance"]
        out["types"][kind] = entry
    primary = [t["accuracy"] for t in out["types"].values() if t.get("accuracy") is not None]
    out["mean_accuracy"] = _mean(primary)
    out["unchecked"] = [k for k, t in out["types"].items() if not t["checked"] and t["n"]]
    return out


def flat(summary: dict[str, Any], prefix: str) -> dict[str, float]:
    """Numeric metrics under `prefix` (e.g. "eval/claims/"): <type>/accuracy, <type>/chance,
    <type>/<check>[_chance], <type>/distinct, <type>/top_share, and the run-wide ones."""
    out = {
        f"{prefix}{k}": float(summary[k])
        for k in ("mean_accuracy", "format_break_rate", "malformed_rate", "repeated_verbatim")
        if summary.get(k) is not None
    }
    for kind, t in summary["types"].items():
        for key in ("accuracy", "chance", "distinct", "top_share", "present"):
            if t.get(key) is not None:
                out[f"{prefix}{kind}/{key}"] = float(t[key])
        for name, c in (t.get("checks") or {}).items():
            out[f"{prefix}{kind}/{name}"] = float(c["accuracy"])
            if c["chance"] is not None:
                out[f"{prefix}{kind}/{name}_chance"] = float(c["chance"])
    return out


def collapse_warnings(
    summary: dict[str, Any], reference: dict[str, Any] | None = None, max_share: float = 0.4
) -> list[str]:
    """Plain-language collapse flags: a claim type whose most common value covers more than
    `max_share` of its claims (unless `reference`, e.g. the teacher's own labels on the same rows,
    is that concentrated too), explanations repeated verbatim on most rows (the same proviso), broken format."""
    out = []
    for kind, t in summary["types"].items():
        share = t.get("top_share")
        ref = ((reference or {}).get("types", {}).get(kind) or {}).get("top_share")
        if share is not None and t["n"] >= 5 and share > max_share and (ref is None or share > ref + 0.1):
            out.append(
                f"{share:.0%} of {kind} claims say {t['top_value']!r}"
                + (f" (the teacher's labels: {ref:.0%})" if ref is not None else "")
                + ": the claim has collapsed to one value."
            )
    repeated, ref = summary.get("repeated_verbatim") or 0, (reference or {}).get("repeated_verbatim")
    if repeated > 0.5 and (ref is None or repeated > ref + 0.1):
        out.append(
            f"{repeated:.0%} of explanations repeat another row's word for word"
            + (f" (the teacher's: {ref:.0%})" if ref is not None else "")
            + "."
        )
    if (summary.get("format_break_rate") or 0) > 0.02:
        out.append(
            f"{summary['format_break_rate']:.0%} of explanations break the {summary['format']} format "
            f"({summary['malformed_rate']:.0%} of claims malformed)."
        )
    return out
