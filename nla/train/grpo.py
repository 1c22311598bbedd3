"""The joint RL step: GRPO on the AV with the live AR as reward; the AR keeps learning on the same text.

One base model in memory carries three LoRA adapters: `av` (the policy, trainable), `av_ref` (the
frozen SFT AV: the KL reference) and `ar` (blocks 0..K, trainable), plus the AR's linear head.
peft's `set_adapter` also flips `requires_grad`, so each phase builds gradients only for its own
adapter: the AR update can never push gradient into the AV, nor the AV update into the AR.

A step, top to bottom (docs/design.md §8):
  rollout    G samples per vector from the AV at temperature T, capped at rl_max_new_tokens
  score      the AR reads each explanation; the forward keeps its graph for the AR update
  update_ar  one supervised MSE step on the successful explanations (shares the score forward)
  rewards    -MSE_nrm (or -log), -2 for failures, optional length / contrastive / grounded claim
             terms; then the advantages: rewards centred within each group, divided by the
             group's std (or the batch's: rl_advantage_norm)
  update_av  clipped policy loss + rl_kl_coef * k3 KL to av_ref (reference pass skipped if 0)
The trainer receives ready objects; the loop is the shared `trainer.Trainer.fit` (batches, logging,
the held-out check, checkpoints through one callback); `nla/stages/rl.py` loads the models and
writes the summary.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nla.core import claims, metrics, rewards, seeds
from nla.core.config import RLConfig
from nla.core.tracking import Tracker
from nla.data.splits import derangement
from nla.models.ar import ARModel
from nla.models.av import Rollout, Verbalizer, response_logprobs
from nla.models.engines import HFEngine
from nla.train.distributed import mean_over_processes, rank_share
from nla.train.loop import OptimizerStep, row_stream, skip_counts
from nla.train.trainer import MAX_GRAD_NORM, Trainer

AV, AV_REF, AR, AR_REF = "av", "av_ref", "ar", "ar_ref"
FAILED = "<failed>"  # a failed rollout in the samples table


@dataclass
class HeldOut:
    """This process's share of the held-out rows RL checks itself on."""

    vectors: torch.Tensor  # [n, d] raw
    contexts: list[claims.Row]  # each row's context and facts (claims are checked against them)


@dataclass
class RLRows:
    """What `fit` trains on: the rl split's vectors [N, d] (raw, the same on every process), one
    context per vector (`claims.Row`: the grounded term and the samples table check against it),
    the data-order seed, the rows already consumed (a resumed checkpoint's cursor), and the
    held-out rows of the check (None: no check)."""

    vectors: torch.Tensor
    contexts: list
    seed: int
    cursor: int = 0
    val: HeldOut | None = None


@dataclass
class RolloutOut:
    rollout: Rollout
    targets: torch.Tensor  # [N, d] raw vector of each row's group (N = n * G): what the AR must reconstruct
    injected: torch.Tensor  # [N, d] what the AV saw (== targets, except in the shuffled-vector control)
    explanations: list[str | None]
    failed: torch.Tensor  # [N] bool: no explanation between tags, its format broken, or hit the length cap
    n_tokens: torch.Tensor  # [N] generated tokens
    truth: torch.Tensor | None = None  # [N] share of each explanation's claims true of its row's context (claim_reward)


@dataclass
class ScoreOut:
    pred: torch.Tensor  # [N, d] fp32 AR predictions before the AR update (detached)
    mse: torch.Tensor  # [N] MSE_nrm of pred vs target
    over_length: torch.Tensor  # [N] bool: AR prompt longer than the AR's max length
    loss: torch.Tensor  # AR loss on usable rows (detached: score has already run its backward)
    usable: torch.Tensor  # [N] bool: rows the AR trains on


@dataclass
class AVUpdateOut:
    loss: float
    policy_loss: float
    kl: float
    clip_fraction: float
    grad_norm: float
    skipped: bool
    engine_k3: float = float("nan")  # k3 of the engine's sampled-token log-probs vs the trainer's (vllm)


@dataclass
class StepOut:
    metrics: dict[str, float]
    samples: list[tuple[int, str, float]] = field(default_factory=list)  # (row of group, explanation, fve)


class JointTrainer(Trainer):
    """GRPO on the AV + supervised AR, on one shared PEFT base model; `fit` (the shared loop) needs
    `rows`, `step` alone does not."""

    name = "rl"

    def __init__(
        self,
        model: nn.Module,
        verbalizer: Verbalizer,
        ar: ARModel,
        tokenizer,
        cfg: RLConfig,
        mse_scale: float,
        target_var: float,
        av_opt: torch.optim.Optimizer,
        ar_opt: torch.optim.Optimizer,
        av_sched=None,
        ar_sched=None,
        accelerator=None,
        max_grad_norm: float = MAX_GRAD_NORM,
        sft_ar: ARModel | None = None,
        engine=None,
        rows: RLRows | None = None,
    ):
        self.model, self.verbalizer, self.ar, self.tokenizer, self.cfg = model, verbalizer, ar, tokenizer, cfg
        self.sft_ar = sft_ar  # frozen SFT AR (adapter AR_REF): scores held-out explanations RL never trained it on
        self.mse_scale, self.target_var = mse_scale, target_var
        self.av_opt, self.ar_opt = av_opt, ar_opt
        self.accelerator, self.max_grad_norm = accelerator, max_grad_norm
        self.av_step = OptimizerStep(AV, av_opt, av_sched, lambda: self._clip(av_opt))
        self.ar_step = OptimizerStep(AR, ar_opt, ar_sched, lambda: self._clip(ar_opt))
        self.engine = engine or HFEngine(verbalizer)  # samples the rollouts (models/engines.py)
        self.av_version = 0  # AV updates so far: an engine holding another version gets the new weights
        self.rows = rows
        self.val_start: dict[str, float] | None = None  # the held-out check before the first step
        self.last_step: tuple[StepOut, torch.Tensor] | None = None  # (the last step's output, its rows)

    # ------------------------------------------------------------------ the loop (Trainer.fit)
    def train_step(self, step: int) -> dict[str, float]:
        """The next global batch of `rows` (each process takes its share from `loop.row_stream`)
        through `step` -> its metrics, averaged over processes."""
        r, acc = self.rows, self.accelerator
        if r is None:
            raise ValueError("JointTrainer.fit needs its rows: JointTrainer(..., rows=RLRows(...)).")
        global_batch = self.cfg.rl_batch_size * (acc.num_processes if acc is not None else 1)
        ids = row_stream(len(r.vectors), r.seed, r.cursor, global_batch)
        ids = torch.tensor(rank_share(ids, acc) if acc is not None else ids)
        r.cursor += global_batch
        device = acc.device if acc is not None else r.vectors.device
        out = self.step(r.vectors[ids].to(device), [r.contexts[int(i)] for i in ids])
        self.last_step = (out, ids)
        return mean_over_processes(out.metrics, acc)

    def postfix(self, metrics_: dict[str, float]) -> str:
        return describe_metrics(metrics_)

    def after_step(self, done: int, tracker: Tracker) -> None:
        """Every rl_table_every steps, the step's samples as a table, each claim marked against its row."""
        if not self.cfg.rl_table_every or done % self.cfg.rl_table_every or self.last_step is None:
            return
        out, ids = self.last_step
        table = []
        for g, text, fve in out.samples:
            context = self.rows.contexts[int(ids[g])]
            marks = claims.mark(self.verbalizer.format, None if text == FAILED else text, context)
            table.append([claims.context_text(context)[-160:], text, claims.marked_text(marks), fve])
        tracker.log_table("rl/samples", ["context_tail", "explanation", "claims", "fve_nrm"], table, done)

    def loop_state(self, done: int) -> dict[str, Any]:
        cursor = self.rows.cursor if self.rows is not None else 0
        return {"cursor": cursor, "skipped": skip_counts(self.av_step, self.ar_step), "val_start": self.val_start}

    def validate(self, step: int) -> dict[str, float]:
        """The held-out check on `rows.val` (`validate_on`); {} when there is none. Step 0's result
        is kept (`val_start`: every checkpoint repeats it, so a resumed run still reports it)."""
        if self.rows is None or self.rows.val is None:
            return {}
        out = self.validate_on(self.rows.val, self.rows.seed + seeds.HELD_OUT_SAMPLING)
        if step == 0:
            self.val_start = out
        return out

    def saved_optimizers(self) -> dict[str, Any]:
        """Both optimizers and schedules under their checkpoint names (`loop.OptimizerStep.saved`)."""
        return {**self.av_step.saved(), **self.ar_step.saved()}

    def validate_on(self, val: HeldOut, seed: int) -> dict[str, float]:
        """`validate_here` on this process's held-out vectors, averaged over processes, and the claim
        checks and collapse signals (`rl/val_claims/*`) on every process's explanations together
        (collective: every process calls it)."""
        m, explanations = self.validate_here(val.vectors, seed, val.contexts)
        m = mean_over_processes(m, self.accelerator)
        g = self.cfg.rl_group_size
        contexts = [c for c in val.contexts for _ in range(g)]
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            explanations, contexts = gather_object(explanations), gather_object(contexts)
        n = len(explanations) // g
        pairing = derangement(n, seed + seeds.CLAIM_CHANCE).tolist() if n >= 2 else None
        others = [pairing[i // g] * g + i % g for i in range(len(explanations))] if pairing else None
        summary = claims.summarize(self.verbalizer.format, explanations, contexts, others)
        return {**m, **claims.flat(summary, "rl/val_claims/")}

    # ------------------------------------------------------------------ the step
    def step(self, vectors: torch.Tensor, contexts: list | None = None) -> StepOut:
        """One joint step on this process's vectors [n, d] (raw); `contexts` (one per vector) are
        needed only by the grounded claim term (claim_reward)."""
        timer = _Timer()
        with timer("sync"):  # the engine gets the AV's current weights (hf: nothing to do)
            self.engine.sync(self.model, AV, self.av_version)
        with timer("rollout"):
            ro = self.rollout(vectors, contexts)
        with timer("score"):
            sc = self.score(ro)
        with timer("update_ar"):
            ar_grad_norm, ar_skipped = self.update_ar(sc)
        with timer("rewards"):  # the reward terms, then group-normalised advantages
            rw = self.reward_terms(ro, sc)
            adv = rewards.group_advantages(rw.total, self.cfg.rl_group_size, scale=self.cfg.rl_advantage_norm)
        with timer("update_av"):
            av = self.update_av(ro, adv)
        out = self.step_metrics(ro, sc, rw, av, ar_grad_norm, ar_skipped)
        out.metrics.update({f"rl/time_{k}_s": v for k, v in timer.seconds.items()})
        if self.engine.name != "hf":  # what the latest sync wrote: the whole model, or only the AV's adapter
            out.metrics["rl/sync_bytes"] = float(self.engine.sync_bytes)
        return out

    @torch.no_grad()
    def validate_here(
        self, vectors: torch.Tensor, seed: int, contexts: list | None = None
    ) -> tuple[dict[str, float], list[str | None]]:
        """A step's rollout, score and rewards on held-out vectors, with no update -> (`rl/val_*`
        metrics, the explanations, G per vector in order).

        The same sampling (G per vector, temperature T) and reward as training, so "the reward rose"
        is measured on fixed vectors instead of read off noisy training batches. It draws from
        `seed` with the training RNG forked around it, so a run with this check trains exactly as one
        without (and resumes the same)."""
        with torch.random.fork_rng(devices=[vectors.device] if vectors.device.type == "cuda" else []):
            torch.manual_seed(seed)
            self.engine.sync(self.model, AV, self.av_version)
            ro = self.rollout(vectors, contexts)
            sc = self.score(ro, train=False)
            rw = self.reward_terms(ro, sc)
            m = {
                "reward_mean": float(rw.total.mean()),
                "extraction_fail_rate": float(ro.failed.float().mean()),
                **self.reconstruction_metrics(ro, sc),
            }
            if self.sft_ar is not None:  # the same explanations read by the SFT AR: the AV's own change
                m["fve_nrm_sft_ar"] = self.sft_ar_fve(ro, sc.usable)
        return {f"rl/val_{k}": v for k, v in m.items()}, ro.explanations  # broken ones too: the claims report them

    @torch.no_grad()
    def sft_ar_fve(self, ro: RolloutOut, usable: torch.Tensor) -> float:
        """Strict FVE of the frozen SFT AR on the usable rollouts (NaN when none is usable)."""
        if not usable.any():
            return float("nan")
        self.model.set_adapter(AR_REF)
        texts = [e or "" for e, ok in zip(ro.explanations, usable.tolist()) if ok]
        pred = self.sft_ar.predict(texts, self.tokenizer)
        return metrics.fve_nrm(pred, ro.targets[usable], self.mse_scale, self.target_var)

    def rollout(self, vectors: torch.Tensor, contexts: list | None = None) -> RolloutOut:
        """G samples per vector. In the shuffled-vector control (`rl_shuffle_control`) the AV sees
        another row's vector (`data.derangement`, seeded from the training RNG so a resume replays
        it) while the AR must still reconstruct the row's own. With claim_reward on, each
        explanation's claims are checked against its own row's context (`contexts`)."""
        self.model.set_adapter(AV)
        self.model.eval()
        g = self.cfg.rl_group_size
        injected = vectors
        if self.cfg.rl_shuffle_control:
            injected = vectors[derangement(len(vectors), int(torch.randint(0, 2**31 - 1, ()))).to(vectors.device)]
        ro = self.engine.rollout(injected, g, self.cfg.rl_temperature, self.cfg.rl_max_new_tokens, self.cfg.rl_top_k)
        answers = [claims.read_answer(self.verbalizer.format, t) for t in ro.texts]  # a broken format is a failure
        explanations = [e for e, _ in answers]
        failed = torch.tensor([not usable for _, usable in answers]) | ro.hit_cap.cpu()
        n_tokens = ro.response_mask.sum(-1).cpu()
        truth = None
        if self.cfg.rl_claim_reward:
            if contexts is None or len(contexts) != len(vectors):
                raise ValueError("claim_reward needs each vector's context.")
            truth = torch.tensor(
                [
                    claims.truth_share(self.verbalizer.format, e, contexts[i // g], self.cfg.rl_claim_quote_chars)
                    for i, e in enumerate(explanations)
                ]
            )
        return RolloutOut(
            ro,
            vectors.repeat_interleave(g, 0).float().cpu(),
            injected.repeat_interleave(g, 0).float().cpu(),
            explanations,
            failed,
            n_tokens,
            truth,
        )

    def chunks(self, rows: int) -> list[slice]:
        """The step's rows in `rl_micro_batch`-row pieces (one piece when 0): what one forward and
        backward of the AV or the AR holds activations for."""
        size = self.cfg.rl_micro_batch or rows
        return [slice(i, min(i + size, rows)) for i in range(0, rows, size)]

    def score(self, ro: RolloutOut, train: bool = True) -> ScoreOut:
        """The AR's predictions of every rollout's vector; training, also the AR loss's gradient
        (each micro-batch's forward and backward in turn, the loss a mean over the step's usable
        rows, so the gradient is the whole step's whatever the micro-batch), which update_ar applies."""
        self.model.set_adapter(AR)
        self.ar.train(train)
        texts = [e or "" for e in ro.explanations]
        ids = self.ar.token_ids(texts, self.tokenizer)
        over = torch.tensor([len(x) > self.ar.max_length for x in ids], dtype=torch.bool)
        usable = ~ro.failed & ~over
        n_usable = max(1, int(usable.sum()))
        if train:
            self.ar_opt.zero_grad(set_to_none=True)
        preds, losses = [], []
        for rows in self.chunks(len(texts)):
            inputs = self.ar.pad_ids(ids[rows], self.tokenizer)
            with torch.set_grad_enabled(train):
                pred = self.ar(inputs.input_ids, inputs.attention_mask)  # [n, d] fp32
                per_row = metrics.mse_nrm(pred, ro.targets[rows].to(pred.device), self.mse_scale)
                # A masked mean (0 when nothing is usable) keeps every rank's backward and all-reduce in step.
                loss = (per_row * usable[rows].to(pred.device)).sum() / n_usable
            if train:
                loss.backward()
            preds.append(pred.detach().float().cpu())
            losses.append(per_row.detach().cpu())
        mse = torch.cat(losses)
        return ScoreOut(torch.cat(preds), mse, over, (mse * usable).sum() / n_usable, usable)

    def update_ar(self, sc: ScoreOut) -> tuple[float, bool]:
        """Apply the gradient `score` left (all-reduced across processes inside ar_step)."""
        return self.ar_step()

    def reward_terms(self, ro: RolloutOut, sc: ScoreOut) -> rewards.Rewards:
        return rewards.compute_rewards(
            sc.mse,
            ro.failed | sc.over_length,
            ro.n_tokens,
            sc.pred,
            ro.targets,
            kind=self.cfg.rl_reward,
            length_coef=self.cfg.rl_length_penalty,
            contrastive_coef=self.cfg.rl_contrastive_coef,
            scale=self.mse_scale,
            group_size=self.cfg.rl_group_size,
            claim_truth=ro.truth,
            claim_coef=self.cfg.rl_claim_reward,
        )

    def av_logprobs(self, ro: RolloutOut, adapter: str = AV, rows: slice = slice(None)) -> torch.Tensor:
        """Per-token log-probs of the rollouts' responses (`rows` of them) under one adapter (AV, or
        AV_REF for the KL term), with the vectors the AV saw injected; the caller picks grad or not."""
        r = ro.rollout
        self.model.set_adapter(adapter)
        vecs = ro.injected[rows].to(r.sequences.device)
        return response_logprobs(
            self.model, r.sequences[rows], r.attention_mask[rows], r.response_mask[rows], vecs, self.verbalizer.hook
        )

    def update_av(self, ro: RolloutOut, advantages: torch.Tensor) -> AVUpdateOut:
        """One GRPO update of the AV, its forward and backward run one micro-batch at a time
        (`chunks`): each piece's token-mean losses weighted by its share of the step's response
        tokens, so the summed gradient is the whole step's."""
        r = ro.rollout
        device = r.sequences.device
        advantages = advantages.to(device)
        total_tokens = r.response_mask.sum().clamp_min(1)
        self.model.train()
        self.av_opt.zero_grad(set_to_none=True)
        sums = torch.zeros(4, device=device)  # loss, policy loss, kl, clip fraction (token-weighted)
        engine_k3 = torch.zeros((), device=device)
        for rows in self.chunks(r.sequences.shape[0]):
            mask = r.response_mask[rows]
            share = mask.sum() / total_tokens
            ref_lp = None
            if self.cfg.rl_kl_coef > 0:
                with torch.no_grad():
                    ref_lp = self.av_logprobs(ro, AV_REF, rows)
            lp = self.av_logprobs(ro, AV, rows)
            # One update per rollout (on-policy): old log-probs are the current ones, detached. The
            # ratio is 1 and the clip inactive, but the gradient is the GRPO gradient; the clip
            # matters if more than one update is ever taken on the same rollouts.
            policy_loss, clip_fraction = rewards.clipped_policy_loss(
                lp, lp.detach(), advantages[rows], mask, self.cfg.rl_clip_eps
            )
            kl = rewards.k3_kl(lp, ref_lp, mask) if ref_lp is not None else torch.zeros((), device=device)
            loss = policy_loss + self.cfg.rl_kl_coef * kl
            (loss * share).backward()
            sums += share * torch.stack([loss.detach(), policy_loss.detach(), kl.detach(), clip_fraction])
            if r.engine_logprobs is not None:  # ~0 when the engine sampled with the trainer's weights and prompt
                engine_k3 += share * rewards.k3_kl(r.engine_logprobs[rows], lp.detach(), mask)
        grad_norm, skipped = self.av_step()
        if not skipped:
            self.av_version += 1
        loss, policy_loss, kl, clip_fraction = sums.tolist()
        return AVUpdateOut(
            loss,
            policy_loss,
            kl,
            clip_fraction,
            grad_norm,
            skipped,
            float(engine_k3) if r.engine_logprobs is not None else float("nan"),
        )

    # ------------------------------------------------------------------ helpers
    def reconstruction_metrics(self, ro: RolloutOut, sc: ScoreOut) -> dict[str, float]:
        """mse_nrm, fve_nrm and top1_in_batch over the usable rows. Same keys on every process (NaN
        when nothing was usable) so the metric gather stays in step."""
        ok = sc.usable
        if not ok.any():
            return dict.fromkeys(("mse_nrm", "fve_nrm", "top1_in_batch"), float("nan"))
        mse = float(sc.mse[ok].mean())
        top1 = top1_in_batch(sc.pred[ok], ro.targets[ok], ro.targets[:: self.cfg.rl_group_size], self.mse_scale)
        return {"mse_nrm": mse, "fve_nrm": metrics.fve_from_mse(mse, self.target_var), "top1_in_batch": top1}

    def _clip(self, opt: torch.optim.Optimizer) -> float:
        """All-reduce the adapter's grads across processes, clip them; -> their norm before clipping."""
        params = [p for group in opt.param_groups for p in group["params"]]
        sync_gradients(params, self.accelerator)
        return float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))

    def step_metrics(
        self, ro: RolloutOut, sc: ScoreOut, rw: rewards.Rewards, av: AVUpdateOut, ar_grad_norm: float, ar_skipped: bool
    ) -> StepOut:
        ok = sc.usable
        n_groups = ro.targets.shape[0] // self.cfg.rl_group_size
        m: dict[str, float] = {
            "rl/reward_mean": float(rw.total.mean()),
            "rl/reward_std": float(rw.total.std(unbiased=False)),
            "rl/extraction_fail_rate": float(ro.failed.float().mean()),
            "rl/response_len": float(ro.n_tokens.float().mean()),
            "rl/non_latin_rate": metrics.non_latin_rate(ro.rollout.texts),
            "rl/kl": av.kl,
            "rl/policy_loss": av.policy_loss,
            "rl/clip_fraction": av.clip_fraction,
            "rl/av_grad_norm": av.grad_norm,
            "rl/av_skipped_step": float(av.skipped),
            "ar/loss": float(sc.loss.detach()),
            "ar/grad_norm": ar_grad_norm,
            "ar/skipped_step": float(ar_skipped),
        }
        m |= {f"rl/{k}": v for k, v in self.reconstruction_metrics(ro, sc).items()}
        m["rl/n_groups"] = float(n_groups)
        if ro.truth is not None:  # the grounded term's pay (its weight times the share of claims true)
            m["rl/reward_claims"] = rw.log_dict("rl/reward_")["rl/reward_claims"]
        if self.engine.name != "hf":
            m["rl/engine_k3"] = av.engine_k3
        fve = metrics.fve_from_mse(sc.mse, self.target_var)
        samples = [
            (i // self.cfg.rl_group_size, e or FAILED, float(fve[i]) if ok[i] else float("nan"))
            for i, e in enumerate(ro.explanations)
        ]
        return StepOut(m, samples)


def top1_in_batch(pred: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor, scale: float) -> float:
    """Share of rows whose AR prediction is nearest (MSE_nrm) to its own vector among the batch's
    distinct vectors. pred, targets: [M, d]; candidates: [n, d]. Template collapse drives it to 1/n."""
    p = metrics.normalize(pred, scale)
    nearest = torch.cdist(p, metrics.normalize(candidates.float(), scale)).min(dim=1).values  # [M]
    own = (p - metrics.normalize(targets.float(), scale)).norm(dim=1)  # [M]
    return float((own <= nearest + 1e-6).float().mean())


def sync_gradients(params: list[nn.Parameter], accelerator) -> None:
    """Average LoRA grads across processes by hand (no DDP wrapper: adapters switch between phases)."""
    if accelerator is None or accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


class _Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def adapter_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The LoRA parameters of one adapter (by name), whatever requires_grad says right now."""
    return [p for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n]


def describe_metrics(metrics_: dict[str, Any]) -> str:
    keys = ["rl/reward_mean", "rl/fve_nrm", "rl/kl", "rl/response_len", "rl/extraction_fail_rate", "ar/loss"]
    return "  ".join(f"{k.split('/')[1]}={metrics_[k]:.3f}" for k in keys if k in metrics_)
