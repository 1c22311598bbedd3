"""How much of model B's residual stream a linear map from model A's explains, on the same texts.

    python bench/translate_ab.py                                  # SmolLM2-135M layer 20 -> Gemma 3 270M layer 11
    python bench/translate_ab.py --model_b DIR --layer_b 3 --max_docs 50

The cross-model channel's first baseline (issue: text as a channel between two models): documents
from the builtin corpus, up to 10 positions each in A's tokenization (as datagen picks them), each
paired with B's token that ends at the same character (nla/data/align.py; unaligned positions are
dropped and counted), A's and B's residuals after their blocks, split 70/15/15 by document; the
ridge translator (nla/core/translate.py) fit on train with λ chosen on val, scored on test by strict
FVE on B, next to the train-mean floor and a translator fit on shuffled pairs. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from nla.core.metrics import fve_nrm
from nla.core.translate import fit_translator
from nla.data.align import align_positions, token_ends
from nla.data.corpus import BUILTIN, iter_documents
from nla.data.extract import choose_positions, document_tokens
from nla.models.backbone import block_output, decoder_layers
from nla.models.sources import load_causal_lm, load_tokenizer, resolve_model


def measure(
    model_a: str, layer_a: int, model_b: str, layer_b: int, max_docs: int, max_tokens: int = 256, seed: int = 0
) -> dict:
    path_a, path_b = resolve_model(model_a), resolve_model(model_b)
    tok_a, tok_b = load_tokenizer(path_a), load_tokenizer(path_b)
    lm_a, lm_b = load_causal_lm(path_a).eval(), load_causal_lm(path_b).eval()
    for name, lm, layer in ((model_a, lm_a, layer_a), (model_b, lm_b, layer_b)):
        n = len(decoder_layers(lm))
        if not 0 <= layer < n:
            raise ValueError(f"layer {layer} is out of range for {name} (blocks 0..{n - 1})")
    began = time.time()
    xs, ys, docs, positions = [], [], [], 0
    for i, doc in enumerate(iter_documents(BUILTIN, max_docs=max_docs)):
        ids_a, _ = document_tokens(tok_a, doc.text, max_tokens)
        ids_b, _ = document_tokens(tok_b, doc.text, 2 * max_tokens)  # B may split finer: its share of the text
        picked = choose_positions(ids_a, set(tok_a.all_special_ids), 10, 16, seed, doc.doc_id)
        pairs = align_positions(
            token_ends(tok_a, doc.text, len(ids_a)), token_ends(tok_b, doc.text, len(ids_b)), picked
        )
        positions += len(picked)
        kept = [(p, q) for p, q in zip(picked, pairs) if q is not None]
        if not kept:
            continue
        with torch.no_grad():
            h_a = block_output(lm_a, torch.tensor([ids_a]), None, layer_a)[0]
            h_b = block_output(lm_b, torch.tensor([ids_b]), None, layer_b)[0]
        for p, q in kept:
            xs.append(h_a[p].float()), ys.append(h_b[q].float()), docs.append(i)
    x, y, doc_of = torch.stack(xs), torch.stack(ys), torch.tensor(docs)
    g = torch.Generator().manual_seed(seed)
    order = doc_of.unique()[torch.randperm(len(doc_of.unique()), generator=g)]
    cut = [0, int(0.7 * len(order)), int(0.85 * len(order)), len(order)]
    train, val, test = (torch.isin(doc_of, order[a:b]) for a, b in zip(cut, cut[1:]))
    translator = fit_translator(x[train], y[train], x[val], y[val])
    shuffled = fit_translator(x[train], y[train][torch.randperm(int(train.sum()), generator=g)], x[val], y[val])
    return {
        "model_a": model_a,
        "layer_a": layer_a,
        "model_b": model_b,
        "layer_b": layer_b,
        "d_a": x.shape[1],
        "d_b": y.shape[1],
        "positions": positions,
        "aligned": len(x),
        "rows_train_val_test": [int(train.sum()), int(val.sum()), int(test.sum())],
        "translator_fve_b": fve_nrm(translator(x[test]), y[test]),
        "train_mean_fve_b": fve_nrm(y[train].mean(0).expand_as(y[test]), y[test]),
        "shuffled_pairs_fve_b": fve_nrm(shuffled(x[test]), y[test]),
        "ridge": translator.ridge,
        "floats_per_vector": y.shape[1],
        "seconds": round(time.time() - began, 1),
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_a", default="embedded:smollm2-135m")
    ap.add_argument("--layer_a", type=int, default=20)
    ap.add_argument("--model_b", default="embedded:gemma3-270m")
    ap.add_argument("--layer_b", type=int, default=11)
    ap.add_argument("--max_docs", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        print(json.dumps(measure(args.model_a, args.layer_a, args.model_b, args.layer_b, args.max_docs)))
    except ValueError as err:
        ap.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
