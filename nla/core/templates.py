"""Every prompt string lives here and nowhere else (template drift puts the marker in the wrong place).

The AV template is the content of ONE user chat message holding `{injection_char}` inside
`<concept>...</concept>`; it is tokenized with the chat template and `add_generation_prompt=True`
in one call (a second BOS would shift every position). The AR template is a plain string holding
`{explanation}`, tokenized with `add_special_tokens=True` (keeps BOS where the tokenizer has one).
"""

from __future__ import annotations

import re

# The marker comes last: everything before it is the same for every vector, so a batch computes
# that part once (`av.response_logprobs`); only the few tokens after it run per row.
AV_TEMPLATE = (
    "In two or three short phrases, say what a language model reading a text is thinking about at the "
    "point where it holds this hidden activation: <concept>{injection_char}</concept>"
)
AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"
TEACHER_TEMPLATE = (
    # What a position's activation carries most is its own token and the few before it, then the
    # topic (docs/benchmarks.md: an AR reading the last characters quoted + the topic reached 76%
    # of an AR reading the raw context; last words without punctuation, 14%). So a real teacher is
    # asked for the information of the extractive one, in its own words, the exact ending first:
    # the AV writes left to right, and what it writes first steers the rest.
    "Here is the start of a text, cut off mid-way:\n<text>{context}</text>\n"
    "Describe what a language model reading this text is representing at its very last token, in three "
    "short phrases separated by semicolons: first the exact final characters of the text in double quotes "
    "(punctuation, symbols and line breaks included, exactly as written); then what is likely to come next; then "
    "the topic. "
    "Answer in the form <explanation>phrase; phrase; phrase</explanation>"
)
# `nla eval`'s paraphrase control: same claims, other words (the AR should score it about the same).
PARAPHRASE_TEMPLATE = (
    "Rewrite the following description in different words. Keep every claim and its meaning; "
    "add nothing and drop nothing.\n<text>{explanation}</text>\n"
    "Answer in the form <explanation>rewritten description</explanation>"
)
# `nla eval --judge openai`: an LLM lists an explanation's claims and marks each against the context.
JUDGE_TEMPLATE = (
    "Here is the start of a text, cut off mid-way:\n<text>{context}</text>\n"
    "Someone described what a language model reading this text is representing at its very last token:\n"
    "<description>{explanation}</description>\n"
    "Split the description into its separate claims. For each claim, judge it against the text only: "
    "SUPPORTED if the text shows it is true, CONTRADICTED if the text shows it is false, UNCHECKABLE if the text "
    "cannot tell. Write one line per claim, the verdict first.\n"
    "Answer in the form <verdicts>\nSUPPORTED | claim\nCONTRADICTED | claim\n</verdicts>"
)
VERDICTS_OPEN, VERDICTS_CLOSE = "<verdicts>", "</verdicts>"
EXPLANATION_OPEN, EXPLANATION_CLOSE = "<explanation>", "</explanation>"
# The context-oracle AR (`--ar_text context`) reads the raw context's last this many characters
# (~30 tokens of English, three times the quote the extractive teacher keeps; kept short because
# the oracle trains in every demo): the ceiling an explanation of the position could reach.
ORACLE_CONTEXT_CHARS = 120

_EXPLANATION_RE = re.compile(re.escape(EXPLANATION_OPEN) + r"(.*?)" + re.escape(EXPLANATION_CLOSE), re.S)


def av_user_message(injection_char: str, template: str = AV_TEMPLATE) -> str:
    if "{injection_char}" not in template:
        raise ValueError("The AV template must contain the placeholder {injection_char}.")
    return template.format(injection_char=injection_char)


# Chat templates that print today's date (Llama 3.x: `strftime_now`, unless `date_string` is given)
# would change the AV prompt from day to day; every AV prompt is rendered with this date instead.
CHAT_TEMPLATE_DATE = "01 Jan 2025"


class NoChatTemplate(ValueError):
    """The tokenizer has no chat template (a base model): the AV prompt cannot be built."""


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise NoChatTemplate(
            f"the tokenizer of {name} has no chat template (a base model?); "
            "pass --chat_template FILE with a Jinja chat template"
        )


def av_prompt_ids(tokenizer, injection_char: str, template: str = AV_TEMPLATE) -> list[int]:
    """Token ids of the canonical AV prompt (chat template + generation prompt, one tokenization)."""
    require_chat_template(tokenizer)
    messages = [{"role": "user", "content": av_user_message(injection_char, template)}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False, date_string=CHAT_TEMPLATE_DATE
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def av_response(explanation: str) -> str:
    """The AV's target text for SFT."""
    return f"{EXPLANATION_OPEN}\n{explanation.strip()}\n{EXPLANATION_CLOSE}"


def ar_prompt(explanation: str, template: str = AR_TEMPLATE) -> str:
    """The AR's input text. Not stripped: explanations arrive stripped (`extract_explanation`), and
    a raw context's trailing space or newline is often the very token at the position."""
    if "{explanation}" not in template:
        raise ValueError("The AR template must contain the placeholder {explanation}.")
    return template.format(explanation=explanation)


def context_tail(context: str, n_chars: int = ORACLE_CONTEXT_CHARS) -> str:
    """What the context-oracle AR reads instead of an explanation: the context's last `n_chars`
    characters verbatim, whitespace and punctuation included (the position's token is the last)."""
    return context[-n_chars:] if n_chars > 0 else ""


def ar_suffix(template: str = AR_TEMPLATE) -> str:
    """The fixed text after the explanation; its token ids are recorded as `critic_suffix_ids`."""
    return template.split("{explanation}", 1)[1]


def teacher_prompt(context: str, template: str = TEACHER_TEMPLATE) -> str:
    return template.format(context=context)


def judge_prompt(context: str, explanation: str) -> str:
    return JUDGE_TEMPLATE.format(context=context, explanation=explanation)


def extract_explanation(text: str) -> str | None:
    """The text between the explanation tags, or None when the tags are missing/empty (a failure)."""
    match = _EXPLANATION_RE.search(text)
    if match is None:
        return None
    inner = match.group(1).strip()
    return inner or None
