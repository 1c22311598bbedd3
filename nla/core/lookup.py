"""Text-free baselines: what a lookup table of the position's last tokens predicts.

No model and no explanation: the mean normalised training vector of the rows whose context ends
in the same last token (`order=1`) or the same last two tokens (`order=2`), backing off to fewer
tokens and finally to the mean of all training rows. An NLA that scores below this table explains
less of the activation than "which token is this?" does. Pure: token ids and tensors in.
"""

from __future__ import annotations

import torch

from nla.core import metrics

LOOKUPS = {"token_lookup": 1, "bigram_lookup": 2}  # the baselines eval reports: name -> how many last tokens


def lookup_predict(
    train_ids: list[list[int]], train_vectors: torch.Tensor, eval_ids: list[list[int]], order: int, scale: float
) -> tuple[torch.Tensor, list[int]]:
    """train_ids / eval_ids: each row's token ids (at least its last `order`); train_vectors [N, d] raw.
    -> (predictions [n, d] at norm `scale`, the key length used per eval row: `order` .. 1, or 0 for
    the overall mean)."""
    if order < 1:
        raise ValueError(f"order={order}: the lookup needs at least the last token.")
    unit = metrics.normalize(train_vectors.float(), scale)  # [N, d]
    tables: list[dict[tuple[int, ...], list[int]]] = []
    for k in range(1, order + 1):
        table: dict[tuple[int, ...], list[int]] = {}
        for row, ids in enumerate(train_ids):
            if len(ids) >= k:
                table.setdefault(tuple(ids[-k:]), []).append(row)
        tables.append(table)
    overall = unit.mean(dim=0)
    preds, used = [], []
    for ids in eval_ids:
        for k in range(min(order, len(ids)), 0, -1):
            rows = tables[k - 1].get(tuple(ids[-k:]))
            if rows:
                preds.append(unit[rows].mean(dim=0))
                used.append(k)
                break
        else:
            preds.append(overall)
            used.append(0)
    pred = torch.stack(preds) if preds else torch.empty(0, unit.shape[1])
    return metrics.normalize(pred, scale), used
