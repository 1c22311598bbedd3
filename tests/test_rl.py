"""Joint RL on a learnable toy: the AR can only reconstruct the vector if the AV names the right word.

Vectors are drawn around four centres, each with its word. The AR is warm-started on word -> centre;
the AV on a partly faithful mapping (40% of its training words are random), so it reads the vector
some of the time. Tests: GRPO moves the policy towards rewarded answers; reward with the real
vectors stands far above the shuffled-vector control (the reward comes from reading the vector);
each phase only touches its own adapter; resume is exact.
"""

from __future__ import annotations

import json

import pytest
import torch

from nla.core import rewards, templates
from nla.core.config import ConfigError, parse_config
from nla.core.sidecar import Meta, make_token_spec
from nla.data.splits import load_split, write_split
from nla.models.sources import ModelSource
from nla.testing import nan_gradients_once, save_tiny_model
from nla.train import grpo

WORDS = ["red", "green", "blue", "yellow"]
LAYER = 1


def _toy_splits(data_dir, model_dir, tokenizer, d: int = 64, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(WORDS), d, generator=g) * 4.0
    meta = Meta(
        "nla_dataset",
        make_token_spec(tokenizer, "㈠"),
        d_model=d,
        layer_index=LAYER,
        base_model=str(model_dir),
        extra={"suggested_injection_scale": float(centres.norm(dim=1).mean())},
    )
    for split, n in [("av_sft", 128), ("ar_sft", 128), ("rl", 128), ("val", 64), ("test", 32)]:
        k = torch.randint(0, len(WORDS), (n,), generator=g)
        vectors = centres[k] + 0.05 * torch.randn(n, d, generator=g)
        words = [WORDS[i] for i in k]
        if split == "av_sft":  # a partly faithful warm start: 40% of the words are drawn at random
            noise = torch.rand(n, generator=g) < 0.4
            k = torch.where(noise, torch.randint(0, len(WORDS), (n,), generator=g), k)
            words = [WORDS[i] for i in k]
        columns = {
            "doc_id": [f"{split}-{i}" for i in range(n)],
            "explanation": words,
            "detokenized_text_truncated": words,
            "prompt": [templates.ar_prompt(w) if split == "ar_sft" else templates.av_user_message("㈠") for w in words],
            "response": [templates.av_response(w) for w in words],
        }
        write_split(data_dir / f"{split}.parquet", vectors, columns, meta)


def _cfg(out, model_dir, *extra):
    cfg, _ = parse_config(
        [
            "--config",
            "configs/smoke.yaml",
            "--model",
            str(model_dir),
            "--output_dir",
            str(out),
            "--layer",
            str(LAYER),
            "--av_steps",
            "100",
            "--av_lr",
            "1e-2",
            "--av_batch_size",
            "16",
            "--av_lora_r",
            "8",
            "--ar_steps",
            "60",
            "--ar_lr",
            "5e-3",
            "--ar_batch_size",
            "8",
            "--av_max_new_tokens",
            "28",
            "--rl_steps",
            "8",
            "--rl_batch_size",
            "8",
            "--rl_group_size",
            "4",
            "--rl_av_lr",
            "2e-3",
            "--rl_ar_lr",
            "1e-6",
            "--rl_kl_coef",
            "0.0",
            "--rl_max_new_tokens",
            "28",
            "--rl_save_every",
            "4",
            "--rl_temperature",
            "1.0",
            "--ar_eval_every",
            "60",
            "--av_eval_every",
            "60",
            "--ar_save_every",
            "60",
            "--av_save_every",
            "60",
            *map(str, extra),
        ]
    )
    return cfg


@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("rl-toy-model"), initializer_range=0.2)


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory, toy_model_dir, tiny_tokenizer):
    """SFT AV (format only) + SFT AR (word -> centre) on the toy, shared by the RL tests."""
    from nla.stages import train_ar, train_av

    out = tmp_path_factory.mktemp("rl-toy")
    _toy_splits(out / "data", toy_model_dir, tiny_tokenizer)
    cfg = _cfg(out, toy_model_dir)
    train_ar.run(cfg)
    av = train_av.run(cfg)
    assert av["extraction_fail_rate"] < 0.5, av  # the warm start writes the answer format
    return out


def _run_rl(warm_start, model_dir, out, *extra):
    """RL from the shared warm start into its own folder (the SFT checkpoints are read, not written)."""
    from nla.stages import rl

    cfg = _cfg(
        out,
        model_dir,
        "--av_checkpoint",
        warm_start / "av" / "final",
        "--ar_checkpoint",
        warm_start / "ar" / "final",
        "--data_dir",
        warm_start / "data",
        *extra,
    )
    return rl.run(cfg)


class _SayRed:
    """A reward that only depends on the word: GRPO must make 'red' more frequent."""

    def __init__(self):
        self.rates: list[float] = []

    def __call__(self, trainer, ro, sc):
        said = torch.tensor([float((e or "").strip() == "red") for e in ro.explanations])
        self.rates.append(float(said.mean()))
        zero = torch.zeros_like(said)
        return rewards.Rewards(
            total=rewards.apply_failures(said, ro.failed),
            reconstruction=said,
            length=zero,
            contrastive=zero,
            claims=zero,
            failed=ro.failed,
        )


def test_grpo_moves_the_policy_towards_rewarded_answers(warm_start, toy_model_dir, tmp_path, monkeypatch):
    reward = _SayRed()
    monkeypatch.setattr(grpo.JointTrainer, "reward_terms", lambda self, ro, sc: reward(self, ro, sc))
    _run_rl(warm_start, toy_model_dir, tmp_path / "red", "--rl_steps", "12")
    start, end = reward.rates[0], sum(reward.rates[-4:]) / 4
    # Measured with the shared row stream and schedule (RL seeds 0-3): 0.14 -> 0.39, 0.09 -> 0.88,
    # 0.12 -> 0.61, 0.10 -> 0.40; without updates the rate stays at the warm start's ~0.1-0.2.
    assert end > start + 0.2, reward.rates


def test_joint_rl_raises_held_out_reward_above_its_start_and_the_shuffled_control(warm_start, toy_model_dir, tmp_path):
    """The issue's learnability check. rl/val_* is measured on 64 fixed val vectors, G samples each at
    T = 1, before step 1 and after the last (same reward as training, no update). Measured on this toy
    (seeds 0-2): -0.72 -> -0.35 / -0.69 -> -0.47 / -0.72 -> -0.42; the shuffled control stays near -1.6.
    With the marker last in the AV prompt the 60-step warm start of this 4-layer random model started
    at -1.49 (format failures) and only reached -1.02; 100 warm-start steps: -0.75 -> -0.42, control -1.51."""
    longer = [
        "--rl_steps",
        "60",
        "--rl_batch_size",
        "16",
        "--rl_av_lr",
        "1e-3",
        "--rl_save_every",
        "60",
        "--rl_val_rows",
        "64",
    ]
    real = _run_rl(warm_start, toy_model_dir, tmp_path / "real", *longer)
    control = _run_rl(warm_start, toy_model_dir, tmp_path / "control", *longer, "--rl_shuffle_control", "true")
    start, end = real["val_start"]["reward_mean"], real["val"]["reward_mean"]
    assert end > start + 0.15, (start, end)
    assert end > control["val"]["reward_mean"] + 0.5, (end, control["val"])
    assert json_rewards(tmp_path / "real") > json_rewards(tmp_path / "control") + 0.5  # training rewards too
    assert real["checkpoint"].endswith("rl/final") and control["checkpoint"].endswith("rl_shuffle_control/final")
    first = json.loads((tmp_path / "real" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"rl/val_reward_mean", "rl/val_fve_nrm", "rl/val_extraction_fail_rate"} <= set(first)  # logged before step 1
    logged = set().union(*(json.loads(line) for line in (tmp_path / "real" / "metrics.jsonl").read_text().splitlines()))
    assert {
        "rl/reward_mean",
        "rl/fve_nrm",
        "rl/kl",
        "rl/top1_in_batch",
        "rl/response_len",
        "rl/extraction_fail_rate",
        "rl/non_latin_rate",
        "ar/loss",
        "rl/time_rollout_s",
        "rl/time_rewards_s",
        "rl/time_update_av_s",
    } <= logged


def json_rewards(run_dir) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [r["rl/reward_mean"] for r in rows if "rl/reward_mean" in r]
    return sum(values) / len(values)


def _adapters(checkpoint) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        f"{part}/{k}": v
        for part in ("av", "ar")
        for k, v in load_file(str(checkpoint / part / "adapter_model.safetensors")).items()
    } | {"head": load_file(str(checkpoint / "ar" / "value_head.safetensors"))["weight"]}


def test_resume_is_exact(warm_start, toy_model_dir, tmp_path):
    _run_rl(
        warm_start,
        toy_model_dir,
        tmp_path / "straight",
        "--rl_steps",
        "4",
        "--rl_save_every",
        "2",
        "--rl_kl_coef",
        "0.01",
    )
    _run_rl(
        warm_start, toy_model_dir, tmp_path / "split", "--rl_steps", "2", "--rl_save_every", "2", "--rl_kl_coef", "0.01"
    )
    _run_rl(
        warm_start, toy_model_dir, tmp_path / "split", "--rl_steps", "4", "--rl_save_every", "2", "--rl_kl_coef", "0.01"
    )
    a, b = _adapters(tmp_path / "straight" / "rl" / "final"), _adapters(tmp_path / "split" / "rl" / "final")
    sft = _adapters_sft(warm_start)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(not torch.allclose(a[k], sft[k]) for k in a if k.startswith("av/"))  # RL did change the AV
    state = json.loads((tmp_path / "split" / "rl" / "final" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["cursor"] == 4 * 8
    from nla.core.sidecar import MODEL_META, read_meta

    reward = read_meta(tmp_path / "split" / "rl" / "final" / "av" / MODEL_META).extra["training"]["reward"]
    assert reward["reward"] == "neg_mse" and reward["claim_reward"] == 0.0 and reward["advantage_norm"] == "group"


def test_the_grounded_term_refuses_a_format_no_rule_checks(warm_start, toy_model_dir, tmp_path):
    """The toy AV writes free text: paying for true claims would pay nothing, silently. Refused instead."""
    with pytest.raises(ConfigError, match="claim_reward 0.5: the AV writes the free format"):
        _run_rl(warm_start, toy_model_dir, tmp_path / "cr", "--rl_claim_reward", "0.5", "--rl_steps", "1")


def test_held_out_check_leaves_training_unchanged(warm_start, toy_model_dir, tmp_path):
    """rl/val_* samples under a forked RNG: a run with it trains exactly as a run without it."""
    with_val = _run_rl(
        warm_start,
        toy_model_dir,
        tmp_path / "val",
        "--rl_steps",
        "2",
        "--rl_val_rows",
        "16",
        "--rl_val_every",
        "1",
        "--rl_table_every",
        "1",
    )
    without = _run_rl(warm_start, toy_model_dir, tmp_path / "noval", "--rl_steps", "2", "--rl_val_rows", "0")
    assert "val" in with_val and "val" not in without
    # every held-out check carries the collapse signals (the toy's one-word answers: free text, unchecked claims)
    checks = [json.loads(x) for x in (tmp_path / "val" / "metrics.jsonl").read_text().splitlines()]
    checks = [c for c in checks if "rl/val_reward_mean" in c]
    assert [c["step"] for c in checks] == [0, 1, 2]
    for c in checks:
        assert 1 <= c["rl/val_claims/phrase/distinct"] <= 16 * 4 and 0 < c["rl/val_claims/phrase/top_share"] <= 1
        assert 0 <= c["rl/val_claims/repeated_verbatim"] <= 1 and c["rl/val_claims/format_break_rate"] == 0
    tables = [json.loads(x) for x in (tmp_path / "val" / "tables.jsonl").read_text().splitlines()]
    samples = [t for t in tables if t.get("key") == "rl/samples"]
    assert samples and "claims" in samples[0]["columns"], tables[:1]
    a, b = _adapters(tmp_path / "val" / "rl" / "final"), _adapters(tmp_path / "noval" / "rl" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _adapters_sft(warm_start) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    av = load_file(str(warm_start / "av" / "final" / "av" / "adapter_model.safetensors"))
    return {f"av/{k}": v for k, v in av.items()}


def _joint(warm_start, toy_model_dir, tmp_path):
    """The SFT pair loaded as RL loads it, in a JointTrainer with plain AdamW -> (trainer, {adapter: params})."""
    from nla.stages import rl

    cfg = _cfg(
        tmp_path,
        toy_model_dir,
        "--av_checkpoint",
        warm_start / "av" / "final",
        "--ar_checkpoint",
        warm_start / "ar" / "final",
        "--rl_kl_coef",
        "0.01",
    )
    model, tok, verbalizer, ar, _, sft_ar = rl.load_joint(
        cfg,
        warm_start / "av" / "final" / "av",
        warm_start / "ar" / "final" / "ar",
        None,
        torch.device("cpu"),
        ModelSource.of(cfg.model),
    )
    params = {a: grpo.adapter_parameters(model, a) for a in (grpo.AV, grpo.AV_REF, grpo.AR, grpo.AR_REF)}
    av_opt = torch.optim.AdamW(params[grpo.AV], lr=1e-2)
    ar_opt = torch.optim.AdamW(params[grpo.AR] + [ar.head.weight], lr=1e-2)
    return grpo.JointTrainer(model, verbalizer, ar, tok, cfg.rl, 8.0, 1.0, av_opt, ar_opt, sft_ar=sft_ar), params


def test_each_phase_only_moves_its_own_adapter(warm_start, toy_model_dir, tmp_path):
    """The AR step never reaches the AV (nor av_ref), and the AV step never reaches the AR."""
    trainer, params = _joint(warm_start, toy_model_dir, tmp_path)
    snap = lambda: {a: [p.detach().clone() for p in ps] for a, ps in params.items()}  # noqa: E731
    moved = lambda before, after, a: any(not torch.equal(x, y) for x, y in zip(before[a], after[a]))  # noqa: E731
    vectors = load_split(warm_start / "data" / "rl.parquet").vectors[:4]
    ro = trainer.rollout(vectors)
    before = snap()
    sc = trainer.score(ro, train=False)
    if sc.usable.any():  # before any update the live AR is the SFT AR: both read the same FVE
        m = trainer.reconstruction_metrics(ro, sc)
        assert trainer.sft_ar_fve(ro, sc.usable) == pytest.approx(m["fve_nrm"], abs=1e-4)
    trainer.update_ar(trainer.score(ro))
    mid = snap()
    assert moved(before, mid, grpo.AR) and not moved(before, mid, grpo.AV) and not moved(before, mid, grpo.AV_REF)
    adv = torch.linspace(-1, 1, len(ro.explanations))
    out = trainer.update_av(ro, adv)
    after = snap()
    assert moved(mid, after, grpo.AV) and not moved(mid, after, grpo.AR) and not moved(mid, after, grpo.AV_REF)
    assert not moved(before, after, grpo.AR_REF)  # the SFT AR that scores held-out explanations never trains
    if sc.usable.any():  # ... and after the AR's update it still reads as the SFT AR did
        assert trainer.sft_ar_fve(ro, sc.usable) == pytest.approx(m["fve_nrm"], abs=1e-4)
    assert out.kl >= 0.0


def test_micro_batches_give_the_whole_steps_update(warm_start, toy_model_dir, tmp_path):
    """`rl_micro_batch` 3 (uneven pieces of 8 rollouts) gives the AV and AR the gradient the whole step
    at once does, to float rounding, and the same losses; the pieces are what one backward holds.
    (Gradients, not weights, are compared: AdamW's first step divides each gradient by its own size,
    which turns rounding in a near-zero component into a full-size change.)"""
    import dataclasses

    vectors = load_split(warm_start / "data" / "rl.parquet").vectors[:2]
    grads, outs, ro = {}, {}, None
    for micro in (0, 3):
        trainer, params = _joint(warm_start, toy_model_dir, tmp_path / str(micro))
        trainer.cfg = dataclasses.replace(trainer.cfg, rl_micro_batch=micro, rl_group_size=4)
        assert [r.stop - r.start for r in trainer.chunks(8)] == ([8] if micro == 0 else [3, 3, 2])
        if ro is None:
            torch.manual_seed(0)
            ro = trainer.rollout(vectors)  # the same rollouts for both (the AVs are equal)
        grads[micro] = {}
        for a, stepper in ((grpo.AV, trainer.av_step), (grpo.AR, trainer.ar_step)):  # the gradients applied
            take = stepper.optimizer.step

            def step(take=take, a=a, micro=micro, params=params):
                grads[micro][a] = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params[a]]
                return take()

            stepper.optimizer.step = step
        sc = trainer.score(ro)
        trainer.update_ar(sc)
        av = trainer.update_av(ro, torch.linspace(-1, 1, len(ro.explanations)))
        outs[micro] = (float(sc.loss), av.loss, av.policy_loss, av.kl, av.grad_norm)
    for a in (grpo.AV, grpo.AR):
        scale = max(float(g.abs().max()) for g in grads[0][a])
        assert scale > 0, a  # a real gradient, so equality means something
        same = all(torch.allclose(x, y, rtol=1e-4, atol=1e-5 * scale) for x, y in zip(grads[0][a], grads[3][a]))
        assert same, a
    assert outs[3] == pytest.approx(outs[0], rel=1e-4, abs=1e-7)


def test_a_non_finite_gradient_skips_that_update_in_both_phases(warm_start, toy_model_dir, tmp_path):
    """Fault injection on real gradients (as a bf16 overflow would produce): the poisoned update is
    skipped and counted, the next one applies."""
    trainer, params = _joint(warm_start, toy_model_dir, tmp_path)
    vectors = load_split(warm_start / "data" / "rl.parquet").vectors[:4]
    ro = trainer.rollout(vectors)
    adv = torch.linspace(-1, 1, len(ro.explanations))
    for adapter, update, stepper in (
        (grpo.AR, lambda: trainer.update_ar(trainer.score(ro)), trainer.ar_step),
        (grpo.AV, lambda: trainer.update_av(ro, adv), trainer.av_step),
    ):
        nan_gradients_once(stepper, params[adapter])
        before = [p.detach().clone() for p in params[adapter]]
        update()
        assert stepper.skipped == 1 and all(torch.equal(x, y) for x, y in zip(before, params[adapter])), adapter
        update()
        assert stepper.skipped == 1 and any(not torch.equal(x, y) for x, y in zip(before, params[adapter])), adapter
        assert all(torch.isfinite(p).all() for p in params[adapter])


def test_a_rollout_that_breaks_the_avs_format_is_a_failure(warm_start, toy_model_dir, tmp_path):
    """The toy AV answers with one word between the tags: its own (free) format. Held to the extractive
    grammar instead (`ends with "…"; about …`), every rollout breaks it, and each gets the failure
    reward, while its text is kept for the report."""
    from nla.core import claims

    trainer, _ = _joint(warm_start, toy_model_dir, tmp_path)
    vectors = load_split(warm_start / "data" / "rl.parquet").vectors[:4]
    torch.manual_seed(0)
    free = trainer.rollout(vectors)
    assert trainer.verbalizer.format.name == "free" and (~free.failed).any()
    trainer.verbalizer.format = claims.ExtractiveFormat()
    torch.manual_seed(0)
    held = trainer.rollout(vectors)
    assert held.rollout.texts == free.rollout.texts and held.explanations == free.explanations  # the same answers
    assert held.failed.all()
    total = trainer.reward_terms(held, trainer.score(held, train=False)).total
    assert torch.allclose(total, torch.full_like(total, rewards.FAIL_REWARD))


def test_the_grounded_claim_term_pays_each_rollout_for_its_own_rows_claims(warm_start, toy_model_dir, tmp_path):
    """claim_reward on: each rollout's claims are checked against its own row's context, and the
    reward is the reconstruction reward plus weight x the share true. The toy AV writes one free
    word, so the rows are held to the extractive format with each row's context built to end in
    (or not in) the word its first rollout wrote: the same text is true for one row and false for another."""
    from dataclasses import replace

    from nla.core import claims

    trainer, _ = _joint(warm_start, toy_model_dir, tmp_path)
    trainer.cfg = replace(trainer.cfg, rl_claim_reward=0.5)
    trainer.verbalizer.format = claims.ExtractiveFormat(claim_types=("quote",))
    vectors = load_split(warm_start / "data" / "rl.parquet").vectors[:2]
    g = trainer.cfg.rl_group_size
    with pytest.raises(ValueError, match="context"):
        trainer.rollout(vectors)
    # The toy AV's one-word answers are wrapped the way the format writes a quote.
    engine_rollout = trainer.engine.rollout
    trainer.engine.rollout = lambda *a, **k: _quoted(engine_rollout(*a, **k))
    torch.manual_seed(0)
    first = trainer.rollout(vectors, ["", ""])
    word = first.explanations[0][len('ends with "') : -1]
    contexts = [f"some text ending in {word}", "some text ending elsewhere"]
    torch.manual_seed(0)
    ro = trainer.rollout(vectors, contexts)
    expected = [
        claims.truth_share(trainer.verbalizer.format, e, contexts[i // g]) for i, e in enumerate(ro.explanations)
    ]
    assert ro.truth.tolist() == expected and ro.truth[0] == 1.0
    sc = trainer.score(ro, train=False)
    rw = trainer.reward_terms(ro, sc)
    ok = ~rw.failed
    assert torch.allclose(rw.total[ok], (-sc.mse + 0.5 * ro.truth)[ok])
    assert (rw.total[~ok] == rewards.FAIL_REWARD).all()


def _quoted(ro):
    """A rollout whose answers are rewritten as `ends with "<word>"` between the tags."""
    from nla.core import templates

    texts = []
    for t in ro.texts:
        said = templates.extract_explanation(t)
        texts.append(t if said is None else t.replace(said, 'ends with "' + said.strip() + '"', 1))
    ro.texts = texts
    return ro
