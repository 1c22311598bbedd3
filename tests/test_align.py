"""The cross-model channel's alignment (nla/data/align.py) on constructed texts where two tokenizers
split differently: the tiny tokenizer at two vocabulary sizes (different merges), and the embedded
model's real tokenizer."""

from __future__ import annotations

import pytest

from nla.data.align import align_positions, token_ends
from nla.testing import build_tiny_tokenizer


def test_constructed_ends_align_only_at_shared_boundaries():
    # A reads "the|cat|s", B reads "th|e|cats": A's "the" ends at 3 as B's "e" does; A's "cat" ends
    # at 6 where no B token ends; A's "s" ends at 7 with B's "cats".
    ends_a, ends_b = [3, 6, 7], [2, 3, 7]
    assert align_positions(ends_a, ends_b, [0, 1, 2]) == [1, None, 2]


def test_split_characters_and_special_tokens_have_no_partner():
    # A spells one 2-byte character as two tokens ending at the same char: only the second aligns;
    # B does too, and its last token ending there is the partner; BOS (None) never aligns.
    ends_a = [None, 4, 5, 5, 9]
    ends_b = [None, 2, 4, 5, 5, 9]
    assert align_positions(ends_a, ends_b, [0, 1, 2, 3, 4]) == [None, 2, None, 4, 5]


@pytest.mark.parametrize(
    "text", ["The cat sat on the mat because it was warm.", "def tokenize(text): return text.split()  # ünïcode"]
)
def test_two_real_tokenizers_agree_on_the_characters_read(text):
    """For every aligned pair, A's tokens up to its position and B's up to the partner decode to the
    same characters; two tokenizers that split differently still share most word ends."""
    a, b = build_tiny_tokenizer(600), build_tiny_tokenizer(300)
    ids_a = a(text, add_special_tokens=True)["input_ids"]
    ids_b = b(text, add_special_tokens=True)["input_ids"]
    assert ids_a != ids_b and len(ids_b) > len(ids_a)  # really different splits
    ends_a, ends_b = token_ends(a, text, len(ids_a)), token_ends(b, text, len(ids_b))
    pairs = align_positions(ends_a, ends_b, list(range(len(ids_a))))
    aligned = [(p, q) for p, q in enumerate(pairs) if q is not None]
    assert len(aligned) >= len(ids_a) // 3
    for p, q in aligned:
        assert a.decode(ids_a[: p + 1]) == b.decode(ids_b[: q + 1]) == text[: ends_a[p]]
    for p, q in enumerate(pairs):  # and no pair was missed where the prefixes agree
        if q is None and ends_a[p] is not None and p + 1 < len(ends_a) and ends_a[p + 1] != ends_a[p]:
            assert ends_a[p] not in [e for e in ends_b if e is not None]
