"""What a dataset's vectors carry, and which of it an explanation could use: for each candidate
fact about a position, how well a linear probe reads it from the layer-K vector (could an AV say
it?) and how much of the vector it explains beyond the position's own token (would an AR use it?).

    python bench/probe.py --data_dir runs/demo-long/data            # ~1.5 minutes on 2 CPU cores

Every fact is checkable on the row's context (the document up to and including the position's
token): the tokens before the position, the model's own next-token prediction where datagen
recorded it (`--teacher_claims ...,next`), and rules on the context (the kind of line, inside
brackets or quotes, how far into the sentence and the line, whether the token starts a word, which
32-token band of the document). Fit on the training splits (ar_sft, av_sft, rl), scored on test:

- `probe`: a softmax probe from the vector to the fact, next to the majority value and a table from
  the own token to the fact's most frequent value (what a reader who knows only the token says);
- `fve_token`: strict FVE of a ridge map from the own token (one-hot) to the normalised vector, a
  lookup-table reader; `fve_with_truth`: the same map given the own token and the fact's true
  value; `fve_with_probe`: given the own token and the probe's reading of the fact. A claim can lift
  an NLA above the token lookup only where these are above `fve_token`; `fve_with_probe` also
  counts what a wrong reading carries about the vector (it is a function of the vector), so a
  claim must be read right, not only differently, to pass the truth checks.

Prints a table, then one JSON object. Reads the tokenizer from the dataset's sidecar (`base_model`).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from nla.core import metrics
from nla.core.translate import fit_ridge
from nla.data.splits import load_split, split_path
from nla.models.sources import ModelSource

TRAIN_SPLITS = ("ar_sft", "av_sft", "rl")
CODE_LINE = re.compile(r"^(\s{4,}|>>>|\.\.\.\s)")
LIST_LINE = re.compile(r"^\s*([-*+]|\d+[.)])\s")
RIDGE_LAMBDA = 1.0
POSITION_BAND = 32  # tokens: the position's band in the document, 0-31 ... 96+


def _line(context: str) -> str:
    return context.rsplit("\n", 1)[-1]


def _paragraph(context: str) -> str:
    return context.rsplit("\n\n", 1)[-1]


def kind_of_line(context: str) -> str:
    line = _line(context)
    return "code" if CODE_LINE.match(line) else "list item" if LIST_LINE.match(line) else "prose"


def in_brackets(context: str) -> str:
    para = _paragraph(context)
    depth = para.count("(") - para.count(")") + para.count("[") - para.count("]")
    return "inside" if depth > 0 else "outside"


def in_quotes(context: str) -> str:
    para = _paragraph(context)
    odd = para.count("`") % 2 or para.count('"') % 2
    return "inside" if odd else "outside"


def words_into_sentence(context: str) -> str:
    n = len(re.split(r"[.!?:]\s|\n\n", context)[-1].split())
    return "0-1" if n <= 1 else "2-4" if n <= 4 else "5-9" if n <= 9 else "10+"


def chars_into_line(context: str) -> str:
    n = len(_line(context))
    return "<8" if n < 8 else "8-31" if n < 32 else "32-63" if n < 64 else "64+"


CONTEXT_RULES: dict[str, Callable[[str], str]] = {
    "kind of line": kind_of_line,
    "in brackets": in_brackets,
    "in quotes": in_quotes,
    "words into sentence": words_into_sentence,
    "chars into line": chars_into_line,
}


def targets(split, tokenizer, offsets: list[int]) -> dict[str, list[int | str]]:
    """Per row: the token ids at each offset back from the position (1 = its own token), the own
    token again (`_own`, the readers' base), the model's next token where datagen recorded it, and
    each context rule's value."""
    contexts = [c or "" for c in split.column("detokenized_text_truncated")]
    ids = [tokenizer.encode(c, add_special_tokens=False) for c in contexts]
    out: dict[str, list] = {}
    for k in offsets:
        out[f"token -{k - 1}" if k > 1 else "token"] = [row[-k] if len(row) >= k else -1 for row in ids]
    out["_own"] = [row[-1] if row else -1 for row in ids]
    if "model_next_token" in split.columns:
        out["model's next token"] = list(split.column("model_next_token"))
    own_text = [tokenizer.decode(row[-1:]) for row in ids]
    out["starts a word"] = [str(t[:1].isspace() or not t[:1].isalnum()) for t in own_text]
    for name, rule in CONTEXT_RULES.items():
        out[name] = [rule(c) for c in contexts]
    out["position / 32"] = [str(min(int(p) // POSITION_BAND, 3)) for p in split.column("position")]
    return out


def fit_probe(x: torch.Tensor, labels: list, epochs: int, seed: int, hidden: int = 0) -> Callable[[torch.Tensor], list]:
    """A softmax probe fit full-batch (linear, or with `hidden` > 0 one GELU layer of that width
    with dropout: does a nonlinear reader find more?); returns the reader: vectors -> labels."""
    classes = {c: i for i, c in enumerate(sorted(set(labels), key=str))}
    y = torch.tensor([classes[c] for c in labels])
    torch.manual_seed(seed)
    if hidden > 0:
        layers = [torch.nn.Dropout(0.2), torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Dropout(0.3)]
        probe = torch.nn.Sequential(*layers, torch.nn.Linear(hidden, len(classes)))
    else:
        probe = torch.nn.Linear(x.shape[1], len(classes))
    opt = torch.optim.Adam(probe.parameters(), lr=1e-3, weight_decay=1e-4)
    probe.train()
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(probe(x), y).backward()
        opt.step()
    probe.eval()
    inverse = {i: c for c, i in classes.items()}

    @torch.no_grad()
    def read(v: torch.Tensor) -> list:
        return [inverse[i] for i in probe(v).argmax(1).tolist()]

    return read


def one_hot(values: list, classes: dict) -> torch.Tensor:
    """[n, len(classes) + 1]; the last column holds values never seen in training."""
    x = torch.zeros(len(values), len(classes) + 1)
    x[torch.arange(len(values)), torch.tensor([classes.get(v, len(classes)) for v in values])] = 1.0
    return x


def ridge_fve(
    fit: tuple[torch.Tensor, torch.Tensor], x_test: torch.Tensor, y_test: torch.Tensor, scale: float
) -> float:
    """Strict FVE on test of a ridge map `fit` = (W, b) from `translate.fit_ridge`."""
    weight, bias = fit
    pred = (x_test.double() @ weight + bias).float()
    return metrics.fve_nrm(metrics.normalize(pred, scale), y_test, scale)


def measure(data_dir: Path, offsets: list[int], epochs: int, seed: int, hidden: int = 0) -> dict[str, dict[str, float]]:
    splits = [load_split(split_path(data_dir, s)) for s in TRAIN_SPLITS]
    test = load_split(split_path(data_dir, "test"))
    tokenizer = ModelSource().tokenizer(test.meta.base_model)
    raw_train, raw_test = torch.cat([s.vectors for s in splits]).float(), test.vectors.float()
    scale = raw_train.shape[1] ** 0.5
    y_train, y_test = metrics.normalize(raw_train, scale), metrics.normalize(raw_test, scale)
    mu, sd = raw_train.mean(0), raw_train.std(0) + 1e-6
    x_train, x_test = (raw_train - mu) / sd, (raw_test - mu) / sd
    train_t = [targets(s, tokenizer, offsets) for s in splits]
    train_t = {k: sum((t[k] for t in train_t), []) for k in train_t[0] if all(k in t for t in train_t)}
    test_t = targets(test, tokenizer, offsets)
    own = {c: i for i, c in enumerate(sorted(set(train_t["_own"])))}
    own_train, own_test = one_hot(train_t["_own"], own), one_hot(test_t["_own"], own)
    fve_token = ridge_fve(fit_ridge(own_train, y_train, RIDGE_LAMBDA), own_test, y_test, scale)
    results = {}
    for name in [k for k in train_t if not k.startswith("_") and k in test_t]:
        read = fit_probe(x_train, train_t[name], epochs, seed, hidden)(x_test)
        truth = test_t[name]
        majority = collections.Counter(train_t[name]).most_common(1)[0][0]
        table = collections.defaultdict(collections.Counter)
        for own_id, value in zip(train_t["_own"], train_t[name]):
            table[own_id][value] += 1
        from_token = [table[o].most_common(1)[0][0] if o in table else None for o in test_t["_own"]]
        classes = {c: i for i, c in enumerate(sorted(set(train_t[name]), key=str))}
        fit = fit_ridge(torch.cat([own_train, one_hot(train_t[name], classes)], 1), y_train, RIDGE_LAMBDA)
        n = len(truth)
        results[name] = {
            "probe": sum(p == t for p, t in zip(read, truth)) / n,
            "majority": sum(t == majority for t in truth) / n,
            "from_own_token": sum(f == t for f, t in zip(from_token, truth)) / n,
            "seen_in_train": sum(t in classes for t in truth) / n,
            "classes": len(classes),
            "fve_token": fve_token,
            "fve_with_truth": ridge_fve(fit, torch.cat([own_test, one_hot(truth, classes)], 1), y_test, scale),
            "fve_with_probe": ridge_fve(fit, torch.cat([own_test, one_hot(read, classes)], 1), y_test, scale),
        }
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, type=Path, help="a datagen output folder")
    parser.add_argument("--offsets", default="1,2,3,4", help="token offsets back from the position (1: its own)")
    parser.add_argument("--epochs", type=int, default=300, help="full-batch Adam steps per probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=0, help="0: linear probes; N: one hidden layer of width N")
    args = parser.parse_args(argv)
    offsets = [int(k) for k in args.offsets.split(",")]
    results = measure(args.data_dir, offsets, args.epochs, args.seed, args.hidden)
    print(f"strict FVE of a reader that knows only the own token: {next(iter(results.values()))['fve_token']:.3f}")
    print(f"{'fact':<22} {'probe':>6} {'majority':>9} {'own token':>10} {'seen':>5} {'+truth':>7} {'+probe':>7}")
    for name, r in results.items():
        print(
            f"{name:<22} {r['probe']:>6.3f} {r['majority']:>9.3f} {r['from_own_token']:>10.3f} {r['seen_in_train']:>5.2f}"
            f" {r['fve_with_truth'] - r['fve_token']:>+7.3f} {r['fve_with_probe'] - r['fve_token']:>+7.3f}"
        )
    print(
        json.dumps({"data_dir": str(args.data_dir), "epochs": args.epochs, "hidden": args.hidden, "results": results})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
