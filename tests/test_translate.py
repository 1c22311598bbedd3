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
