"""The linear translator (nla/core/translate.py): it recovers a planted linear map, and learns
nothing from shuffled pairs."""

from __future__ import annotations

import torch

from nla.core.metrics import fve_nrm
from nla.core.translate import SCALES, fit_translator


def _planted(n: int, d_a: int = 24, d_b: int = 40, noise: float = 0.01, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m, b = torch.randn(d_a, d_b, generator=g), torch.randn(d_b, generator=g) * 3
    x = torch.randn(n, d_a, generator=g) @ torch.randn(d_a, d_a, generator=g)  # correlated inputs
    return x, x @ m + b + noise * torch.randn(n, d_b, generator=g)


def test_a_planted_map_is_recovered():
    x, y = _planted(1200)
    t = fit_translator(x[:800], y[:800], x[800:1000], y[800:1000])
    assert fve_nrm(t(x[1000:]), y[1000:], scale=1.0) > 0.999  # strict FVE, as every NLA number
    assert t.ridge in t.val_mse and len(t.val_mse) == len(SCALES)


def test_shuffled_pairs_give_the_floor():
    x, y = _planted(1200)
    perm = torch.randperm(1200, generator=torch.Generator().manual_seed(1))
    t = fit_translator(x[:800], y[perm][:800], x[800:1000], y[perm][800:1000])
    test = y[perm][1000:]
    fve = fve_nrm(t(x[1000:]), test, scale=1.0)
    floor = fve_nrm(y[perm][:800].mean(0).expand_as(test), test, scale=1.0)  # the training mean, always
    assert abs(fve - floor) < 0.05  # the mean is all there is to learn
    assert fve < 0.0 and t.ridge > min(t.val_mse) * 1e3  # and validation chose strong shrinkage


def test_the_bench_measures_two_real_models_on_aligned_rows(tmp_path):
    """bench/translate_ab.py end to end. A model against itself: all but split characters align and the
    translator finds the identity (strict FVE ~ 1) while shuffled pairs stay at the floor. Against a
    model reading the same texts with another tokenizer (the tiny one at 300 tokens instead of 600):
    rows are aligned and the unaligned dropped and counted."""
    import importlib.util
    import sys
    from pathlib import Path

    from nla.models.sources import tiny_llama
    from nla.testing import build_tiny_tokenizer, save_tiny_model

    path = Path(__file__).parents[1] / "bench" / "translate_ab.py"
    spec = importlib.util.spec_from_file_location("nla_bench_translate", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    a = save_tiny_model(tmp_path / "a", initializer_range=0.2)
    same = bench.measure(str(a), 2, str(a), 2, max_docs=60)
    assert 0.95 * same["positions"] <= same["aligned"] <= same["positions"]  # only split characters drop
    assert same["translator_fve_b"] > 0.99 and same["shuffled_pairs_fve_b"] < same["train_mean_fve_b"] + 0.05

    small = build_tiny_tokenizer(300)
    ids = {"pad_token_id": small.pad_token_id, "eos_token_id": small.eos_token_id, "bos_token_id": small.bos_token_id}
    tiny_llama(len(small), d_model=48, n_layers=4, seed=1, initializer_range=0.2, **ids).save_pretrained(tmp_path / "b")
    small.save_pretrained(tmp_path / "b")
    cross = bench.measure(str(a), 2, str(tmp_path / "b"), 2, max_docs=60)
    assert cross["d_a"] == 64 and cross["d_b"] == 48 and 0 < cross["aligned"] < cross["positions"]
    assert sum(cross["rows_train_val_test"]) == cross["aligned"]
