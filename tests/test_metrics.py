"""Metrics against known answers: constructed vectors whose MSE / FVE / retrieval is known."""

import math

import pytest
import torch

from nla.core import metrics as M


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_normalize_norm_dtype_and_zero_row():
    v = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.bfloat16)
    out = M.normalize(v, 10.0)
    assert out.dtype == torch.float32
    assert out[0].tolist() == pytest.approx([6.0, 8.0])
    assert out[1].tolist() == [0.0, 0.0]  # no NaN from 0/0
    assert M.normalize(torch.ones(1, 16)).norm().item() == pytest.approx(4.0)  # default sqrt(d)


def test_mse_is_two_times_one_minus_cos_at_default_scale():
    g = _gen()
    pred, target = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g) * 7
    torch.testing.assert_close(M.mse_nrm(pred, target), 2 * (1 - M.cosine(pred, target)), atol=1e-5, rtol=0)
    # At another scale s it is (s^2 / d) * 2 (1 - cos).
    torch.testing.assert_close(
        M.mse_nrm(pred, target, 2.0), 4 / 32 * 2 * (1 - M.cosine(pred, target)), atol=1e-6, rtol=0
    )


def test_identical_orthogonal_opposite():
    e = torch.eye(4)
    assert M.mse_nrm(e, 5 * e).tolist() == pytest.approx([0.0] * 4, abs=1e-6)
    assert M.mse_nrm(e, e.roll(1, dims=0)).tolist() == pytest.approx([2.0] * 4)
    assert M.mse_nrm(e, -3 * e).tolist() == pytest.approx([4.0] * 4)
    assert M.cosine(e, -e).tolist() == pytest.approx([-1.0] * 4)


def test_exact_predictions_score_perfectly():
    t = torch.randn(50, 16, generator=_gen(1))
    out = M.summarize(2 * t, t)  # scaling the prediction must not matter
    assert set(out) == {"mse", "fve_nrm", "fve_vs_mean_pred", "cos", "fve_centered"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["mse"] == pytest.approx(0.0, abs=1e-6)
    for key in ("fve_nrm", "fve_vs_mean_pred", "cos", "fve_centered"):
        assert out[key] == pytest.approx(1.0, abs=1e-5), key


def test_tiny_2d_example_by_hand():
    # d = 2, scale sqrt(2). Normalised targets (sqrt2, 0), (0, sqrt2); mean (sqrt2/2, sqrt2/2);
    # each squared distance to the mean is 1, averaged over d -> Var = 0.5.
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert M.target_variance(t) == pytest.approx(0.5)
    # Row 0 exact (MSE 0); row 1 predicts (1, 1): cos = 1/sqrt2, MSE = 2 - sqrt2.
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert M.mse_nrm(p, t).tolist() == pytest.approx([0.0, 2 - math.sqrt(2)], abs=1e-6)
    # FVE = 1 - (1 - sqrt2/2) / 0.5 = sqrt2 - 1.
    assert M.fve_nrm(p, t) == pytest.approx(math.sqrt(2) - 1, abs=1e-6)
    # normalize(mean) = (1, 1): baseline MSE = 2 - sqrt2 per row -> lenient FVE = 0.5.
    assert M.fve_vs_mean_pred(p, t) == pytest.approx(0.5, abs=1e-6)
    # An explicit var is used as given.
    assert M.fve_nrm(p, t, var=1.0) == pytest.approx(1 - (1 - math.sqrt(2) / 2), abs=1e-6)


def test_predicting_normalized_mean_gives_zero_lenient_fve():
    t = torch.randn(40, 8, generator=_gen(2)) + 2.0
    mean = M.target_mean(t)
    pred = mean.expand_as(t).clone() * 3  # any positive multiple normalises to the same vector
    assert M.fve_vs_mean_pred(pred, t) == pytest.approx(0.0, abs=1e-6)
    # The strict FVE is lower: the re-normalised mean is worse than the raw mean.
    assert M.fve_nrm(pred, t) < 0.0


def test_lenient_fve_is_never_below_strict():
    g = _gen(3)
    t, p = torch.randn(30, 8, generator=g) + 1, torch.randn(30, 8, generator=g) + 1
    assert M.fve_vs_mean_pred(p, t) >= M.fve_nrm(p, t)


def test_centered_metrics_see_through_anisotropy():
    # Targets share one big direction plus small noise: predicting that direction has cos ~ 1,
    # but it explains nothing of what distinguishes the rows.
    g = _gen(4)
    common = torch.zeros(32)
    common[0] = 20.0
    t = common + torch.randn(200, 32, generator=g)
    pred = M.target_mean(t).expand_as(t)
    assert float(M.cosine(pred, t).mean()) > 0.9
    assert abs(float(M.centered_cosine(pred, t).mean())) < 0.05
    # Strict FVE shows ~0 for this mean predictor; centred, it scores like a constant guess.
    assert M.fve_nrm(pred, t) == pytest.approx(0.0, abs=0.05)
    assert M.fve_centered(pred, t) < -0.5
    # The exact prediction is still perfect when centred.
    assert M.centered_cosine(t, t).tolist() == pytest.approx([1.0] * 200, abs=1e-5)


def test_top1_exact_predictions():
    t = torch.randn(100, 16, generator=_gen(5))
    assert M.top1_retrieval(t, t, n_candidates=16, generator=_gen(0)) == 1.0


def test_top1_random_predictions_near_chance():
    g = _gen(6)
    t, p = torch.randn(4000, 16, generator=g), torch.randn(4000, 16, generator=g)
    acc = M.top1_retrieval(p, t, n_candidates=16, generator=_gen(7))
    assert acc == pytest.approx(1 / 16, abs=0.015)  # ~4 sigma over 4000 rows


def test_top1_constructed_miss():
    t = torch.eye(3)
    # Row 0 predicts row 1's target: with all others as candidates it retrieves the wrong one.
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.1, 0.0, 1.0]])
    assert M.top1_retrieval(p, t, n_candidates=16, generator=_gen(0)) == pytest.approx(2 / 3)
    # Two rows, two candidates: row 0 misses, row 1 hits.
    assert M.top1_retrieval(p[:2, :2], t[:2, :2], n_candidates=2) == 0.5


def test_top1_candidates_are_other_rows_without_replacement():
    rows = torch.arange(5)
    others = M._sample_others(6, rows, 5, _gen(0))
    for r, picked in zip(rows.tolist(), others.tolist()):
        assert sorted(picked) == [i for i in range(6) if i != r]


def test_non_latin_rate():
    texts = ["hello world", "café naïve Straße", "这是一个测试", "mixed 日本 text"]
    assert M.non_latin_rate(texts) == 0.5
    assert M.non_latin_rate(["Привет"]) == 1.0  # Cyrillic is outside Latin too
    assert M.non_latin_rate(["123 !? → ✓"]) == 0.0  # not letters
    assert M.non_latin_rate([]) == 0.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        M.mse_nrm(torch.zeros(3, 4), torch.zeros(3, 5))


def test_fve_from_mse_per_row_and_batch_agree():
    """The one 1 - MSE/Var: per-row FVEs average to the batch FVE; a zero Var is floored, not divided by."""
    pred, target = torch.randn(6, 8), torch.randn(6, 8)
    var = M.target_variance(target)
    rows = M.fve_from_mse(M.mse_nrm(pred, target), var)
    assert rows.shape == (6,) and float(rows.mean()) == pytest.approx(M.fve_nrm(pred, target, var=var))
    assert M.fve_from_mse(0.5, 2.0) == 0.75 and math.isfinite(M.fve_from_mse(0.5, 0.0))
