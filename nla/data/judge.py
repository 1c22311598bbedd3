"""The LLM judge of `nla eval --judge openai`: lists each explanation's claims and marks each
supported / contradicted / uncheckable against the row's context.

Free-form explanations (real teachers) have no rule that checks them; a judge does. It goes
through the same OpenAI-compatible client as `--teacher openai` (concurrency, timeouts, retries,
one-line errors), with its own endpoint, model and key options (`--judge_*`; off by default, so
nothing is sent anywhere unasked), and the same crash-safe cache: a rerun sends only what is
missing. Its chance level is the same judge on the same explanations read against another row's
context (the caller passes the pairing).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nla.core import templates
from nla.data.teacher import OpenAITeacher, TeacherCache, explain

VERDICTS = ("supported", "contradicted", "uncheckable")
_LINE = re.compile(r"^[\W\d_]*(SUPPORTED|CONTRADICTED|UNCHECKABLE|NOT CHECKABLE)\W*(.*)$", re.I)


def parse_verdicts(answer: str) -> list[dict[str, str]] | None:
    """`<verdicts>SUPPORTED | claim ...</verdicts>` -> [{"claim", "verdict"}], None when the tags
    are missing or no line holds a verdict (a malformed answer)."""
    start, end = answer.find(templates.VERDICTS_OPEN), answer.find(templates.VERDICTS_CLOSE)
    if start < 0 or end < start:
        return None
    out = []
    for line in answer[start + len(templates.VERDICTS_OPEN) : end].splitlines():
        match = _LINE.match(line.strip())
        if match:
            verdict = match.group(1).lower().replace("not checkable", "uncheckable")
            out.append({"claim": match.group(2).strip(), "verdict": verdict})
    return out or None


def make_judge(cfg) -> OpenAITeacher | None:
    """The judge `cfg.judge` asks for, or None (`--judge none`)."""
    j = cfg.judge
    if j.judge == "none":
        return None
    return OpenAITeacher.from_options(
        j,
        "judge",
        j.judge_concurrency * 4,
        open_tag=templates.VERDICTS_OPEN,
        finish=close_verdicts,
        prompt=lambda item: item,
    )


def close_verdicts(text: str, ended: bool) -> str:
    """A prefilled judge answer's continuation: up to its closing tag, closed if the judge stopped without it."""
    close = templates.VERDICTS_CLOSE
    if close in text:
        return text[: text.index(close) + len(close)]
    return text + close if ended else text


def _rates(rows: list[list[dict[str, str]] | None]) -> dict[str, float | None]:
    claims = [c["verdict"] for r in rows if r for c in r]
    share = {v: (claims.count(v) / len(claims) if claims else None) for v in VERDICTS}
    return {
        "accuracy": share["supported"],
        "contradicted": share["contradicted"],
        "uncheckable": share["uncheckable"],
        "n_claims": len(claims),
        "claims_per_explanation": len(claims) / max(1, sum(r is not None for r in rows)),
    }


def judge_claims(
    judge: OpenAITeacher,
    explanations: list[str | None],
    contexts: list[str],
    others: list[int],
    cache_path: str | Path,
    context_chars: int,
    show_progress: bool = True,
) -> tuple[dict[str, Any], list]:
    """Judge every explanation against its own context and, for the chance level, against
    `contexts[others[i]]` -> (summary {accuracy, chance, contradicted, ..., malformed_answers},
    per-row verdict lists, None where the explanation failed or the judge's answer was malformed).
    accuracy = supported claims / all judged claims: an uncheckable claim is not counted as true.
    (`nla eval` checks that the judge is reachable before it explains anything.)"""
    todo = [i for i, e in enumerate(explanations) if e is not None]
    prompts = [templates.judge_prompt(contexts[i][-context_chars:], explanations[i]) for i in todo]
    prompts += [templates.judge_prompt(contexts[others[i]][-context_chars:], explanations[i]) for i in todo]
    done = explain(
        judge,
        prompts,
        TeacherCache(cache_path),
        show_progress,
        template=templates.JUDGE_TEMPLATE,
        parse=parse_verdicts,
        desc="eval: judge",
    )
    real, chance = done.explanations[: len(todo)], done.explanations[len(todo) :]
    rows: list = [None] * len(explanations)
    for i, verdicts in zip(todo, real):
        rows[i] = verdicts
    at_chance = _rates(chance)
    summary = {
        **_rates(real),
        "chance": at_chance["accuracy"],
        "chance_contradicted": at_chance["contradicted"],
        "n_judged": len(todo),
        "malformed_answers": done.n_malformed,
        "requests_sent": done.n_calls,
        "judge": judge.identity,
    }
    return summary, rows
