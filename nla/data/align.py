"""The same place in the same text under two tokenizers (the cross-model channel's paired rows).

Model A's row is a token position in A's tokenization of a document. Its partner in model B is the
B token whose character span ends where A's position token ends: both models have then read exactly
the same characters. A position has no partner, and its row is dropped (and counted), when
  - no B token ends at that character (the tokenizers split the text differently there), or
  - A's token is not the last A token ending there (a character A spells in several byte tokens:
    at the first of them A has not finished reading the character), or
  - A's token covers no characters (a special token such as BOS).
B's partner is the last B token ending there, for the same reason.
"""

from __future__ import annotations

RULE = "the B token whose character span ends where A's position token ends (the last such token on each side)"


def token_ends(tokenizer, text: str, n_tokens: int) -> list[int | None]:
    """End character of each of the first `n_tokens` tokens of `text` as `extract.document_tokens`
    tokenizes it (special tokens added where the tokenizer adds them): None for a token that covers
    no characters. Needs a fast tokenizer (offset mapping)."""
    from nla.data.extract import CHARS_PER_TOKEN_BOUND

    prefix = text[: n_tokens * CHARS_PER_TOKEN_BOUND]
    enc = tokenizer(prefix, add_special_tokens=True, return_offsets_mapping=True)
    return [end if end > start else None for start, end in enc["offset_mapping"][:n_tokens]]


def align_positions(ends_a: list[int | None], ends_b: list[int | None], positions: list[int]) -> list[int | None]:
    """For each of A's token `positions`, the index of its partner B token (module docstring) or None."""
    last_b: dict[int, int] = {}
    for j, end in enumerate(ends_b):
        if end is not None:
            last_b[end] = j  # later tokens overwrite: the last B token ending there
    out: list[int | None] = []
    for p in positions:
        end = ends_a[p]
        if end is None or (p + 1 < len(ends_a) and ends_a[p + 1] == end):
            out.append(None)
        else:
            out.append(last_b.get(end))
    return out
