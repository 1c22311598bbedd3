"""GRPO rewards, advantages, KL and the clipped policy loss for joint AV/AR RL: pure functions.

Layout: a batch of n activation vectors with G sampled explanations each is `[n * G]` rows,
the G consecutive rows of a group belonging to the same vector. Per-token tensors are
`[n * G, T]` with a `mask` (1 = response token) of the same shape.

Reward for an explanation = reconstruction reward from the AR (-MSE_nrm, or -log MSE_nrm)
  - length_coef * n_tokens + contrastive_coef * contrastive term
  + claim_coef * (share of its claims checked true of the row's context: the grounded term, off by
    default because it is not the paper's reward: that RL never sees the context);
a failed row (no extraction, truncated at the length cap, AR prompt too long) gets exactly
FAIL_REWARD = -2, the MSE_nrm of an orthogonal guess, so failing is never better than trying.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nla.core.metrics import normalize

FAIL_REWARD = -2.0
# Floor for MSE under 'neg_log_mse': bounds the reward at -log(1e-4) ~ 9.2 for a perfect match.
LOG_MSE_FLOOR = 1e-4
# Bound on |ref_logp - logp| before exp in k3: one bad token must not overflow the KL to inf.
_MAX_LOG_RATIO = 20.0


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is set (token-level, whole batch). -> scalar.

    An all-zero mask gives 0 instead of NaN.
    """
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def reconstruction_reward(mse: torch.Tensor, kind: str = "neg_mse") -> torch.Tensor:
    """AR reconstruction reward. `[n] -> [n]`.

    'neg_mse': -MSE_nrm, in [-4, 0]. 'neg_log_mse': -log(max(MSE_nrm, LOG_MSE_FLOOR)); it keeps
    resolving differences once MSE is small. Its worst real value is -log 4 ~ -1.39, so
    FAIL_REWARD (-2) stays below every real outcome under both kinds.
    """
    mse = mse.float()
    if kind == "neg_mse":
        return -mse
    if kind == "neg_log_mse":
        return -torch.log(mse.clamp_min(LOG_MSE_FLOOR))
    raise ValueError(f"kind={kind!r}: use 'neg_mse' or 'neg_log_mse'.")


def apply_failures(rewards: torch.Tensor, failed_mask: torch.Tensor) -> torch.Tensor:
    """Set failed rows to exactly FAIL_REWARD. `[n], [n] bool -> [n]`.

    torch.where (not arithmetic) so a NaN/garbage score on a failed row cannot leak through.
    """
    return torch.where(failed_mask.bool(), torch.full_like(rewards, FAIL_REWARD), rewards)


def length_penalty(n_tokens: torch.Tensor, coef: float) -> torch.Tensor:
    """Reward term -coef * n_tokens (already negative, add it). `[n] -> [n]`."""
    return -float(coef) * n_tokens.float()


def contrastive_term(
    pred: torch.Tensor, targets: torch.Tensor, scale: float | None = None, group_size: int = 1
) -> torch.Tensor:
    """How much closer each reconstruction is to its own vector than to the others. -> [N].

    pred, targets: `[N, d]`, N = n * group_size (rows of one group share a target). For row i:

        term_i = mean_{j not in group(i)} MSE_nrm(pred_i, target_j) - MSE_nrm(pred_i, target_i)

    Why this form: on the sphere mean_j MSE(p, t_j) = (s^2/d) * 2 (1 - p^ . mean_j t^_j), so the
    term is 2 (s^2/d) (cos(p, own) - p^ . mean of others): a reconstruction of the batch-mean
    "template" scores ~0 however high its raw cosine, which is what template collapse exploits.
    It is bounded in [-4, 4] at scale sqrt(d) (each MSE is in [0, 4]) and is 0 when the batch
    has a single group (nothing to contrast with). Rows of the same group are excluded because
    their target is the own vector.
    """
    if pred.dim() != 2 or pred.shape != targets.shape:
        raise ValueError(f"pred and targets must both be [N, d]; got {tuple(pred.shape)} and {tuple(targets.shape)}.")
    n_rows, d = pred.shape
    if group_size < 1 or n_rows % group_size:
        raise ValueError(f"{n_rows} rows do not split into groups of {group_size}.")
    p, t = normalize(pred, scale), normalize(targets, scale)
    # Pairwise MSE via |p|^2 + |t|^2 - 2 p.t without an [N, N, d] tensor; clamp rounding below 0.
    sq_p, sq_t = p.pow(2).sum(dim=1), t.pow(2).sum(dim=1)
    pair = ((sq_p[:, None] + sq_t[None, :] - 2 * p @ t.T) / d).clamp_min(0.0)  # [N, N]
    own = pair.diagonal()
    group = torch.arange(n_rows, device=pred.device) // group_size
    other = (group[:, None] != group[None, :]).to(pair.dtype)  # [N, N]
    n_other = other.sum(dim=1)
    if float(n_other.max()) == 0:
        return torch.zeros(n_rows, device=pred.device)
    return (pair * other).sum(dim=1) / n_other - own


@dataclass
class Rewards:
    """Total reward and its parts, all `[N]`. Failed rows: total == FAIL_REWARD exactly."""

    total: torch.Tensor
    reconstruction: torch.Tensor
    length: torch.Tensor
    contrastive: torch.Tensor
    claims: torch.Tensor
    failed: torch.Tensor

    def log_dict(self, prefix: str = "reward/") -> dict[str, float]:
        """Batch means for logging; component means are over non-failed rows only."""
        ok = ~self.failed

        def over_ok(x: torch.Tensor) -> float:
            return float(x[ok].mean()) if bool(ok.any()) else float("nan")

        return {
            f"{prefix}total": float(self.total.mean()),
            f"{prefix}reconstruction": over_ok(self.reconstruction),
            f"{prefix}length": over_ok(self.length),
            f"{prefix}contrastive": over_ok(self.contrastive),
            f"{prefix}claims": over_ok(self.claims),
            f"{prefix}fail_rate": float(self.failed.float().mean()),
        }


def reward_record(rc) -> dict[str, Any]:
    """What an RL run's reward was made of (`rc`: its RLConfig), kept in every RL checkpoint and its
    summary, so eval can say it beside the numbers: a grounded claim term saw the contexts."""
    return {
        "reward": rc.rl_reward,
        "claim_reward": rc.rl_claim_reward,
        "claim_quote_chars": rc.rl_claim_quote_chars,
        "contrastive_coef": rc.rl_contrastive_coef,
        "length_penalty": rc.rl_length_penalty,
        "advantage_norm": rc.rl_advantage_norm,
    }


def describe_reward(record: dict[str, Any] | None) -> str | None:
    """One line of a `reward_record` for people (eval's report, the demo's table, the RL summary);
    None without a record (an SFT checkpoint)."""
    if not record:
        return None
    parts = [f"{'-MSE_nrm' if record.get('reward') == 'neg_mse' else '-log MSE_nrm'} from the live AR"]
    if record.get("claim_reward"):
        parts.append(
            f"+ {record['claim_reward']} x the share of claims checked true of the row's context (the grounded "
            "term: this RL saw the contexts, which the paper's reward never does)"
            + (
                f", a true quote counting its length over {record['claim_quote_chars']} characters"
                if record.get("claim_quote_chars")
                else ""
            )
        )
    parts += [f"+ contrastive x {record['contrastive_coef']}"] if record.get("contrastive_coef") else []
    parts += [f"- {record['length_penalty']} per token"] if record.get("length_penalty") else []
    return f"{' '.join(parts)}; advantages normalised per {record.get('advantage_norm', 'group')}"


@torch.no_grad()
def compute_rewards(
    mse: torch.Tensor,
    failed: torch.Tensor,
    n_tokens: torch.Tensor | None = None,
    pred: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    *,
    kind: str = "neg_mse",
    length_coef: float = 0.0,
    contrastive_coef: float = 0.0,
    scale: float | None = None,
    group_size: int = 1,
    claim_truth: torch.Tensor | None = None,
    claim_coef: float = 0.0,
) -> Rewards:
    """Combine the reward terms. mse, failed, n_tokens, claim_truth: `[N]`; pred, targets: `[N, d]`.

    pred/targets are needed only when contrastive_coef != 0, claim_truth (each row's share of
    claims checked true, in [0, 1]) only when claim_coef != 0. Rewards carry no gradient: the AV
    is trained through advantages, the AR through its own loss.
    """
    failed = failed.bool()
    zeros = torch.zeros_like(mse, dtype=torch.float32)
    recon = reconstruction_reward(mse, kind)
    length = length_penalty(n_tokens, length_coef) if n_tokens is not None and length_coef else zeros
    if contrastive_coef:
        if pred is None or targets is None:
            raise ValueError("contrastive_coef != 0 needs pred and targets.")
        contrast = contrastive_coef * contrastive_term(pred, targets, scale, group_size)
    else:
        contrast = zeros
    if claim_coef:
        if claim_truth is None:
            raise ValueError("claim_coef != 0 needs claim_truth.")
        grounded = float(claim_coef) * claim_truth.float().clamp(0.0, 1.0)
    else:
        grounded = zeros
    total = apply_failures(recon + length + contrast + grounded, failed)
    return Rewards(
        total=total, reconstruction=recon, length=length, contrastive=contrast, claims=grounded, failed=failed
    )


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: str = "group") -> torch.Tensor:
    """GRPO advantages: r minus its group's mean, divided by a spread. `[n * G] -> [n * G]`.

    scale 'group': the group's own std (GRPO), so every group's advantages have unit spread,
    however small its reward differences. 'batch': one std over the whole batch's centred
    rewards, so a group whose samples barely differ pushes little and a group with a real
    difference pushes more (batch-level normalisation). std is the population std (correction 0).
    A group whose rewards are all equal gets exact zeros either way: it carries no signal about
    which sample is better, and rounding in (r - mean) must not be blown up into noise.
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}.")
    if scale not in ("group", "batch"):
        raise ValueError(f"scale={scale!r}: use 'group' or 'batch'.")
    r = rewards.float().reshape(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        std = r.std(dim=1, correction=0, keepdim=True)
    else:
        std = centred.pow(2).mean().sqrt().expand_as(centred)
    adv = centred / (std + eps)
    flat = r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values
    return torch.where(flat, torch.zeros_like(adv), adv).reshape(rewards.shape)


def k3_kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 KL estimator per token: exp(ref - logp) - (ref - logp) - 1 >= 0. `[N, T] -> [N, T]`.

    Unbiased for KL(policy || ref) under samples from the policy, and never negative (unlike
    the plain log-ratio). The log-ratio is clamped to +-20 so one token cannot overflow exp.
    """
    delta = (ref_logp.float() - logp.float()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(delta) - delta - 1.0


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 KL averaged over response tokens (mask). `[N, T] x3 -> scalar`."""
    return masked_mean(k3_kl_per_token(logp, ref_logp), mask)


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate. logp, old_logp, mask: `[N, T]`; advantages: `[N]` (one per row).

    Per token: ratio = exp(logp - old_logp), loss = -min(ratio A, clip(ratio, 1-eps, 1+eps) A),
    averaged over all response tokens of the batch. Returns (loss scalar with grad,
    clip_fraction: detached scalar, the share of response tokens where the clipped branch is
    active, i.e. its gradient is zero). It stays a tensor so logging need not sync the device.
    """
    adv = advantages.float().reshape(-1, 1)
    ratio = torch.exp(logp.float() - old_logp.float())
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = masked_mean(-torch.min(unclipped, clipped), mask)
    is_clipped = ((ratio > 1.0 + clip_eps) & (adv > 0)) | ((ratio < 1.0 - clip_eps) & (adv < 0))
    clip_fraction = masked_mean(is_clipped.float(), mask).detach()
    return loss, clip_fraction
