"""What a dataset's vectors carry, read by linear probes: how well a linear map from the layer-K
vector names the position's token, the tokens before it, and the model's own next-token prediction.

    python bench/probe.py --data_dir runs/demo-long/data            # ~1 minute on 2 CPU cores

It fits one softmax probe per target on the training splits (ar_sft, av_sft, rl) and scores it on
the test split, next to two baselines: the majority label, and a table from the position's own
token to the target's most frequent value (what a reader who knows only the token would say). A
claim an explanation could make is worth training an AV for only where the probe reads it well
above both; docs/benchmarks.md has the numbers for the embedded model. Prints a table, then one
JSON object. Reads the tokenizer from the dataset's sidecar (`base_model`).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

from nla.data.splits import load_split, split_path
from nla.models.sources import ModelSource

TRAIN_SPLITS = ("ar_sft", "av_sft", "rl")


def targets(split, tokenizer, offsets: list[int]) -> dict[str, list[int | str]]:
    """Per row: the token ids at each offset back from the position (1 = its own token), the own
    token again for the lookup baseline, and the model's next token where datagen recorded it."""
    ids = [tokenizer.encode(c or "", add_special_tokens=False) for c in split.column("detokenized_text_truncated")]
    out: dict[str, list] = {}
    for k in offsets:
        out[f"token -{k - 1}" if k > 1 else "token"] = [row[-k] if len(row) >= k else -1 for row in ids]
    out["_own"] = [row[-1] if row else -1 for row in ids]
    if "model_next_token" in split.columns:
        out["model's next token"] = list(split.column("model_next_token"))
    return out


def fit_probe(x: torch.Tensor, labels: list, epochs: int, seed: int) -> tuple[torch.nn.Linear, dict]:
    classes = {c: i for i, c in enumerate(sorted(set(labels), key=str))}
    y = torch.tensor([classes[c] for c in labels])
    torch.manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], len(classes))
    opt = torch.optim.Adam(probe.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(probe(x), y).backward()
        opt.step()
    return probe, classes


def measure(data_dir: Path, offsets: list[int], epochs: int, seed: int) -> dict[str, dict[str, float]]:
    splits = [load_split(split_path(data_dir, s)) for s in TRAIN_SPLITS]
    test = load_split(split_path(data_dir, "test"))
    tokenizer = ModelSource().tokenizer(test.meta.base_model)
    x_train = torch.cat([s.vectors for s in splits])
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (test.vectors - mu) / sd
    train_t = [targets(s, tokenizer, offsets) for s in splits]
    train_t = {k: sum((t[k] for t in train_t), []) for k in train_t[0] if all(k in t for t in train_t)}
    test_t = targets(test, tokenizer, offsets)
    results = {}
    for name in [k for k in train_t if not k.startswith("_") and k in test_t]:
        probe, classes = fit_probe(x_train, train_t[name], epochs, seed)
        inverse = {i: c for c, i in classes.items()}
        with torch.no_grad():
            pred = [inverse[i] for i in probe(x_test).argmax(1).tolist()]
        truth = test_t[name]
        majority = collections.Counter(train_t[name]).most_common(1)[0][0]
        table = collections.defaultdict(collections.Counter)
        for own, value in zip(train_t["_own"], train_t[name]):
            table[own][value] += 1
        from_token = [table[own].most_common(1)[0][0] if own in table else None for own in test_t["_own"]]
        n = len(truth)
        results[name] = {
            "probe": sum(p == t for p, t in zip(pred, truth)) / n,
            "majority": sum(t == majority for t in truth) / n,
            "from_own_token": sum(f == t for f, t in zip(from_token, truth)) / n,
            "seen_in_train": sum(t in classes for t in truth) / n,
            "classes": len(classes),
        }
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, type=Path, help="a datagen output folder")
    parser.add_argument("--offsets", default="1,2,3,4", help="token offsets back from the position (1: its own)")
    parser.add_argument("--epochs", type=int, default=300, help="full-batch Adam steps per probe")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = measure(args.data_dir, [int(k) for k in args.offsets.split(",")], args.epochs, args.seed)
    print(f"{'target':<22} {'probe':>6} {'majority':>9} {'own token':>10} {'seen':>5}")
    for name, r in results.items():
        print(
            f"{name:<22} {r['probe']:>6.3f} {r['majority']:>9.3f} {r['from_own_token']:>10.3f} {r['seen_in_train']:>5.2f}"
        )
    print(json.dumps({"data_dir": str(args.data_dir), "epochs": args.epochs, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
