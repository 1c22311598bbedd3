"""Rewards, advantages, KL and policy loss on hand-computed examples."""

import math

import pytest
import torch

from nla.core import rewards as R


def test_reconstruction_reward_kinds():
    mse = torch.tensor([0.0, 0.5, 2.0, 4.0])
    assert R.reconstruction_reward(mse, "neg_mse").tolist() == pytest.approx([0.0, -0.5, -2.0, -4.0])
    got = R.reconstruction_reward(mse, "neg_log_mse").tolist()
    assert got == pytest.approx([-math.log(R.LOG_MSE_FLOOR), -math.log(0.5), -math.log(2), -math.log(4)])
    assert min(got) > R.FAIL_REWARD  # failing stays worse than any real reconstruction
    with pytest.raises(ValueError):
        R.reconstruction_reward(mse, "mse")


def test_apply_failures_exact_and_ignores_nan():
    r = torch.tensor([-0.3, float("nan"), -1.0])
    out = R.apply_failures(r, torch.tensor([False, True, True]))
    assert out.tolist() == pytest.approx([-0.3, -2.0, -2.0])


def test_length_penalty():
    assert R.length_penalty(torch.tensor([0, 10, 30]), 0.01).tolist() == pytest.approx([0.0, -0.1, -0.3])


def test_contrastive_term_values_and_preference():
    # d = 4, scale 2 = sqrt(d): orthonormal targets. Own match: own MSE 0, others 2 -> +2.
    t = torch.eye(4)
    assert R.contrastive_term(t, t).tolist() == pytest.approx([2.0] * 4, abs=1e-6)
    # Permuted assignment: own MSE 2; others are {0, 2, 2} -> mean 4/3; term = 4/3 - 2.
    shifted = t.roll(1, dims=0)
    assert R.contrastive_term(shifted, t).tolist() == pytest.approx([4 / 3 - 2] * 4, abs=1e-6)


def test_contrastive_term_random_prefers_own_and_ignores_template():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(8, 64, generator=g) + 3.0  # anisotropic: shared direction
    perm = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    assert R.contrastive_term(t, t).mean() > R.contrastive_term(t[perm], t).mean()
    # Predicting the batch-mean template: high raw cosine, contrastive ~ 0 on average.
    template = t.mean(dim=0).expand_as(t)
    assert abs(float(R.contrastive_term(template, t).mean())) < 0.05


def test_contrastive_term_excludes_own_group():
    # 2 vectors x G=2: rows 0,1 share target e0, rows 2,3 share e1. Exact predictions: each row
    # is contrasted only with the other vector (MSE 2), never with its own group's copy (MSE 0).
    e = torch.eye(2)
    t = e.repeat_interleave(2, dim=0)
    assert R.contrastive_term(t, t, group_size=2).tolist() == pytest.approx([2.0] * 4, abs=1e-6)
    # One group only: nothing to contrast with -> 0.
    assert R.contrastive_term(t[:2], t[:2], group_size=2).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        R.contrastive_term(t[:3], t[:3], group_size=2)


def test_compute_rewards_combines_and_fails_exactly():
    t = torch.eye(4)
    mse = torch.tensor([0.5, 1.0, float("nan"), 0.25])
    failed = torch.tensor([False, False, True, False])
    n_tok = torch.tensor([10, 20, 150, 0])
    out = R.compute_rewards(
        mse, failed, n_tok, pred=t, targets=t, kind="neg_mse", length_coef=0.01, contrastive_coef=0.5
    )
    # Row 0: -0.5 - 0.1 + 0.5 * 2 = 0.4 ; row 1: -1 - 0.2 + 1 = -0.2 ; row 3: -0.25 + 1 = 0.75.
    assert out.total.tolist() == pytest.approx([0.4, -0.2, -2.0, 0.75])
    assert out.total[2].item() == R.FAIL_REWARD
    assert out.contrastive.tolist() == pytest.approx([1.0] * 4)
    logs = out.log_dict()
    assert logs["reward/fail_rate"] == 0.25
    assert logs["reward/reconstruction"] == pytest.approx(-(0.5 + 1.0 + 0.25) / 3)
    # Defaults: plain -MSE, no extra terms, no pred/targets needed.
    plain = R.compute_rewards(mse, failed)
    assert plain.total.tolist() == pytest.approx([-0.5, -1.0, -2.0, -0.25])
    with pytest.raises(ValueError):
        R.compute_rewards(mse, failed, contrastive_coef=1.0)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1])
    adv = R.group_advantages(r, 3, eps=0.0)
    z = 1 / math.sqrt(2 / 3)  # population std of (1, 2, 3) is sqrt(2/3)
    assert adv.tolist() == pytest.approx([-z, 0.0, z, 0, 0, 0, 0, 0, 0])
    assert (adv[3:] == 0).all()  # zero-variance groups are exactly zero, rounding included
    # Group of two: (-1, +1) up to eps.
    assert R.group_advantages(torch.tensor([-2.0, 0.0]), 2).tolist() == pytest.approx([-1.0, 1.0], abs=1e-5)
    with pytest.raises(ValueError):
        R.group_advantages(torch.zeros(5), 2)


def test_claim_term_pays_for_true_claims_and_never_rescues_a_failure():
    mse = torch.tensor([0.5, 0.5, 0.5, 0.5])
    truth = torch.tensor([1.0, 0.5, 0.0, 1.0])  # all claims true, half, none; the last row failed
    failed = torch.tensor([False, False, False, True])
    rw = R.compute_rewards(mse, failed, claim_truth=truth, claim_coef=0.4)
    assert rw.total.tolist() == pytest.approx([-0.1, -0.3, -0.5, R.FAIL_REWARD])  # +0.4, +0.2, +0
    assert rw.claims[:3].tolist() == pytest.approx([0.4, 0.2, 0.0])
    assert rw.log_dict()["reward/claims"] == pytest.approx(0.2)
    # Off by default, and a weight with nothing to weigh is an error, not a silent zero.
    assert R.compute_rewards(mse, failed, claim_truth=truth).claims.tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="claim_truth"):
        R.compute_rewards(mse, failed, claim_coef=0.4)


def test_batch_advantages_keep_small_differences_small():
    # Group A barely differs, group B differs a lot. Per-group std blows A's tiny gap up to +-1;
    # one batch std keeps it small next to B's.
    r = torch.tensor([-0.50, -0.49, -1.0, 0.0])
    group = R.group_advantages(r, 2, eps=0.0)
    batch = R.group_advantages(r, 2, eps=0.0, scale="batch")
    assert group.tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0])
    centred = torch.tensor([-0.005, 0.005, -0.5, 0.5])
    assert batch.tolist() == pytest.approx((centred / centred.pow(2).mean().sqrt()).tolist())
    assert abs(batch[1]) < 0.02 and batch[3] > 1.0
    assert batch.reshape(-1, 2).sum(dim=1).abs().max() < 1e-6  # still centred within each group
    flat = R.group_advantages(torch.tensor([0.3, 0.3, -1.0, 0.0]), 2, scale="batch")
    assert flat[:2].tolist() == [0.0, 0.0]  # a zero-variance group carries no signal
    with pytest.raises(ValueError, match="scale"):
        R.group_advantages(r, 2, scale="global")


def test_k3_kl():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    assert R.k3_kl(logp, logp, torch.ones_like(logp)).item() == 0.0
    # delta = ref - logp: log 2 -> 2 - log 2 - 1 ; -1 -> e^-1 + 1 - 1 = e^-1 ; third token masked.
    ref = logp + torch.tensor([[math.log(2), -1.0, 50.0]])
    per_tok = R.k3_kl_per_token(logp, ref)
    assert per_tok[0, :2].tolist() == pytest.approx([1 - math.log(2), math.exp(-1)])
    assert (per_tok >= 0).all() and torch.isfinite(per_tok).all()
    mask = torch.tensor([[1, 1, 0]])
    assert R.k3_kl(logp, ref, mask).item() == pytest.approx((1 - math.log(2) + math.exp(-1)) / 2)


def test_clipped_policy_loss_by_hand():
    eps = 0.2
    old = torch.zeros(4, 1)
    # Rows: ratio 1.5 A=+1 (clipped -> -1.2), ratio 1.1 A=+1 (-1.1),
    #       ratio 0.5 A=-1 (clipped -> +0.8), ratio 1.6 A=-1 (pessimistic, unclipped -> +1.6).
    ratios = torch.tensor([[1.5], [1.1], [0.5], [1.6]])
    logp = ratios.log().requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clip_frac = R.clipped_policy_loss(logp, old, adv, torch.ones(4, 1), eps)
    assert loss.item() == pytest.approx((-1.2 - 1.1 + 0.8 + 1.6) / 4, abs=1e-6)
    assert clip_frac.item() == 0.5 and not clip_frac.requires_grad
    loss.backward()
    # d/dlogp of -ratio*A/4 = -ratio*A/4 where unclipped; exactly 0 where clipped.
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, -1.1 / 4, 0.0, 1.6 / 4])


def test_clipped_policy_loss_single_clipped_token_has_zero_grad_and_mask():
    logp = torch.tensor([[math.log(1.5), math.log(3.0)]], requires_grad=True)
    loss, frac = R.clipped_policy_loss(
        logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([[1, 0]]), clip_eps=0.2
    )
    assert loss.item() == pytest.approx(-1.2)  # masked second token ignored
    assert frac.item() == 1.0
    loss.backward()
    assert logp.grad.tolist() == [[0.0, 0.0]]
