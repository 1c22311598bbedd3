"""`nla demo`: the whole pipeline on the embedded model within a small CPU budget.

    nla demo --config configs/embedded.yaml [--output_dir runs/demo]
    (multi-GPU: run the stages one by one with launch/local.sh; the demo is a single-process tour)

datagen -> AR SFT (+ a short shuffled-target control, + the context-oracle AR that reads the raw
context: the ceiling) -> AV SFT -> eval of the SFT pair on held-out documents -> joint RL (held-out
FVE by step, read by the live AR and by the SFT AR) -> eval of the RL checkpoint ->
`<output_dir>/summary.json`:
    {"sft": <eval report>, "rl": <eval report>, "checkpoint": "<rl/final>", "wall_s": ...,
     "control_margin": {...}, "lookup_margin": {...}}   (each eval report carries its claims and lookups)
Every stage resumes (datagen caches chunks and teacher answers, trainers restart from their newest
checkpoint), so a second `make demo` only redoes what is missing.

With `paired_model` (configs/embedded-cross.yaml, `make demo-cross`) the demo is the cross-model
channel's tour instead: datagen also records model B's activations at the same places; A's AV warm
start; B's AR on the same explanations, B's context oracle and B's own AV; then the channel, A's AV
writing and B's AR reading, against the translator and B's own NLA (nla/stages/cross.py) ->
`<output_dir>/eval_cross/report.md`, summary.json {"cross": <its report>, ...}. The channel's AV is
A's SFT AV: it imitates the teacher whose text B's AR learned to read (A's RL AV is tuned to A's AR).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from nla.core.io import atomic_write_text
from nla.core.lookup import LOOKUPS
from nla.core.rewards import describe_reward
from nla.models.sources import ModelSource
from nla.stages.faithfulness import control_margin, lookup_margin
from nla.stages.stage import start_stage


def _banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def sft_vs_rl_table(sft: dict[str, Any], rl: dict[str, Any]) -> str:
    """Held-out metrics of both checkpoints next to their controls."""
    rows = [
        ("fve_nrm (strict)", "fve_nrm"),
        ("fve_centered", "fve_centered"),
        ("cos_mean", "cos_mean"),
        ("top1_retrieval (of 16)", "top1_retrieval"),
        ("explanation_tokens_mean", "explanation_tokens_mean"),
        ("non_latin_rate", "non_latin_rate"),
    ]
    lines = [f"{'metric':<34}{'SFT':>10}{'RL':>10}"]
    lines += [f"{name:<34}{_fmt(sft.get(key)):>10}{_fmt(rl.get(key)):>10}" for name, key in rows]
    lines.append(
        f"{'floor: best constant prediction':<34}{_fmt(sft.get('fve_floor')):>10}{_fmt(rl.get('fve_floor')):>10}"
    )
    teacher = [(r.get("teacher_explanations") or {}).get("fve_nrm") for r in (sft, rl)]
    if any(t is not None for t in teacher):  # each pair's own AR reading the teacher's text
        lines.append(f"{'ceiling: AR reading teacher text':<34}{_fmt(teacher[0]):>10}{_fmt(teacher[1]):>10}")
    if sft.get("oracle") or rl.get("oracle"):
        oracle = [(r.get("oracle") or {}).get("fve_nrm") for r in (sft, rl)]
        lines.append(f"{'ceiling: oracle AR, raw context':<34}{_fmt(oracle[0]):>10}{_fmt(oracle[1]):>10}")
        lines.append(
            f"{'fraction of oracle (from floor)':<34}{_fmt(sft.get('fraction_of_oracle')):>10}"
            f"{_fmt(rl.get('fraction_of_oracle')):>10}"
        )
    lines.append(f"{'fve_nrm minus best control':<34}{_fmt(control_margin(sft)):>10}{_fmt(control_margin(rl)):>10}")
    if rl.get("independent_ar"):  # the RL AV read by the SFT AR: the AV's own change, no co-trained AR flattering it
        lines.append(
            f"{'fve_nrm, SFT AR reading the AV':<34}{_fmt(sft.get('fve_nrm')):>10}"
            f"{_fmt(rl['independent_ar']['fve_nrm']):>10}"
        )
    for control in sorted(rl.get("controls", {})):
        name = f"control: {control} fve_nrm"
        lines.append(
            f"{name:<34}{_fmt(sft['controls'][control]['fve_nrm']):>10}{_fmt(rl['controls'][control]['fve_nrm']):>10}"
        )
    lines += lookup_rows(sft, rl) + claim_rows(sft, rl)
    if (rl.get("reinjection") or {}).get("kl") is not None:  # the reconstruction patched back into the model
        for name, key in (
            ("reinjection KL, reconstruction", "kl"),
            ("reinjection KL, mean activation", "kl_mean_baseline"),
            ("reinjection KL, another row's", "kl_shuffled_baseline"),
            ("reinjection recovered", "recovered"),
            ("reinjection top-1 agrees", "top1_agree"),
        ):
            lines.append(
                f"{name:<34}{_fmt((sft.get('reinjection') or {}).get(key)):>10}{_fmt(rl['reinjection'].get(key)):>10}"
            )
    if (rl.get("order_shuffled") or {}).get("fve_nrm") is not None:  # the same phrases in another order
        lines.append(
            f"{'phrases reordered fve_nrm':<34}{_fmt((sft.get('order_shuffled') or {}).get('fve_nrm')):>10}"
            f"{_fmt(rl['order_shuffled']['fve_nrm']):>10}"
        )
    if "paraphrase" in rl:  # fve_retained is a ratio, undefined while fve_nrm <= 0: show both FVEs
        lines.append(
            f"{'paraphrased explanations fve_nrm':<34}{_fmt(sft['paraphrase'].get('fve_nrm')):>10}"
            f"{_fmt(rl['paraphrase'].get('fve_nrm')):>10}"
        )
    return "\n".join(lines)


def _row(name: str, sft: Any, rl: Any) -> str:
    return f"{name:<34}{_fmt(sft):>10}{_fmt(rl):>10}"


def lookup_rows(sft: dict[str, Any], rl: dict[str, Any]) -> list[str]:
    """The text-free baselines (a lookup of the last tokens) and the NLA's margin over the stronger one."""
    base = [r.get("baselines") or {} for r in (sft, rl)]
    if "token_lookup" not in base[1]:
        return [f"{'text-free baselines':<34}{'not computed: ' + str(base[1].get('skipped')):>20}"]
    lines = [_row(f"control: {k} fve_nrm", base[0].get(k, {}).get("fve_nrm"), base[1][k]["fve_nrm"]) for k in LOOKUPS]
    return lines + [_row("fve_nrm minus the stronger lookup", lookup_margin(sft), lookup_margin(rl))]


def claim_rows(sft: dict[str, Any], rl: dict[str, Any]) -> list[str]:
    """Claim accuracy per claim type next to its chance level, and the collapse signals."""
    c = [r.get("claims") or {"types": {}} for r in (sft, rl)]
    lines = []
    for kind, t in c[1]["types"].items():
        s = c[0]["types"].get(kind, {})
        if t.get("checked"):
            lines += [
                _row(f"claims: {kind} true", s.get("accuracy"), t.get("accuracy")),
                _row(f"claims: {kind} true, chance", s.get("chance"), t.get("chance")),
            ]
        lines += [
            _row(f"claims: {kind} distinct values", s.get("distinct"), t.get("distinct")),
            _row(f"claims: {kind} most common share", s.get("top_share"), t.get("top_share")),
        ]
    for name, key in (
        ("claims: format breaks", "format_break_rate"),
        ("claims: repeated verbatim", "repeated_verbatim"),
    ):
        lines.append(_row(name, c[0].get(key), c[1].get(key)))
    judged = [x.get("judged") or {} for x in c]
    if judged[1]:
        lines += [
            _row("claims: judge supported", judged[0].get("accuracy"), judged[1].get("accuracy")),
            _row("claims: judge supported, chance", judged[0].get("chance"), judged[1].get("chance")),
        ]
    return lines


def eval_configs(cfg, oracle: dict[str, Any] | None):
    """(SFT eval config, RL eval config): both read the demo's oracle AR unless the user gave one; the
    RL eval's independent AR is the SFT AR unless the user named one: it never saw RL, so a gain it
    reports is the AV's own, not the co-trained AR adapting (design note 11)."""
    eval_cfg = replace(cfg, eval=replace(cfg.eval, oracle_ar=oracle["checkpoint"])) if oracle else cfg
    if cfg.eval.independent_ar:
        return eval_cfg, eval_cfg
    return eval_cfg, replace(eval_cfg, eval=replace(eval_cfg.eval, independent_ar=str(cfg.output_dir / "ar" / "final")))


def report(cfg, summary: dict[str, Any]) -> None:
    """Write summary.json and print the SFT-vs-RL table with where everything went."""
    atomic_write_text(cfg.output_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    _banner("held-out results (strict FVE; controls alongside)")
    print(sft_vs_rl_table(summary["sft"], summary["rl"]))
    reward = summary["rl"].get("rl_reward") or {}
    if reward.get("claim_reward"):  # said next to the numbers: the paper's RL reward never sees the context
        print(f"(RL's reward: {describe_reward(reward)})")
    print(f"\n[demo] stage seconds: {summary['stage_seconds']}")
    print(
        f"[demo] total {summary['wall_s']:.0f}s; reports: {cfg.output_dir / 'eval_sft' / 'report.md'}, "
        f"{cfg.output_dir / 'eval_rl' / 'report.md'}"
    )
    print(f"[demo] summary: {cfg.output_dir / 'summary.json'}")
    print(f"[demo] final checkpoint: {summary['checkpoint']}")


def cross_demo(cfg, acc, timed) -> dict[str, Any]:
    """The cross-model channel's tour (paired_model set): A's data and AV, B's AR, oracle and AV, the channel."""
    from nla.stages import datagen, evaluate, train_ar, train_av

    _banner(
        f"1/6 datagen: A's activations + teacher explanations, and B's ({cfg.data.paired_model}) at the same places"
    )
    data = timed("datagen", datagen.run, cfg)
    print(datagen.describe(data))
    _banner("2/6 A's AV warm start (A's activation -> explanation)")
    print(train_av.describe(timed("train_av", train_av.run, cfg, acc)))
    b = cfg.replace(ar_model=cfg.data.paired_model)
    _banner("3/6 B's AR on the same explanations, predicting B's activation, with a shuffled-target control")
    ar = timed("train_ar_b", train_ar.run, b, acc)
    control = timed("train_ar_b_control", train_ar.run_shuffled_control, b, acc, max(10, cfg.ar.ar_steps // 5))
    print(train_ar.format_table(ar, control))
    _banner("4/6 B's context-oracle AR (reads the raw context: the ceiling for any text)")
    oracle_cfg = b.replace(ar_text="context", ar_steps=cfg.ar.ar_oracle_steps or cfg.ar.ar_steps)
    print(train_ar.format_table(timed("train_ar_b_oracle", train_ar.run, oracle_cfg, acc)))
    _banner("5/6 B's own AV on B's side of the same rows (the same-model NLA)")
    own = train_ar.cross_config(b).replace(ar_model=None, output_dir=str(cfg.output_dir / "b"))
    print(train_av.describe(timed("train_av_b", train_av.run, own, acc)))
    _banner("6/6 the channel: A's AV -> B's AR, against the translator, B's own NLA and B's lookups")
    pair = cfg.replace(
        av_checkpoint=str(cfg.output_dir / "av" / "final"),
        ar_checkpoint=str(train_ar.output_root(b) / "final"),
        oracle_ar=str(train_ar.output_root(oracle_cfg) / "final"),
    )
    own_av = str(cfg.output_dir / "b" / "av" / "final")
    report = timed(
        "eval_cross", evaluate.run, pair, evaluate.EvalArgs(own_av=own_av), report_dir=cfg.output_dir / "eval_cross"
    )
    return {
        "cross": report,
        "datagen": {k: data[k] for k in ("rows", "norms", "paired") if k in data},
        "ar_b": {k: v for k, v in ar.items() if k != "history"},
        "ar_b_shuffled_control": control,
    }


def cross_report(cfg, summary: dict[str, Any]) -> None:
    from nla.stages.cross import format_table

    atomic_write_text(cfg.output_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    _banner("the cross-model channel (held-out rows; strict FVE on B; controls alongside)")
    print(format_table(summary["cross"]))
    print(f"\n[demo] stage seconds: {summary['stage_seconds']}")
    print(f"[demo] total {summary['wall_s']:.0f}s; report: {summary['cross']['files']['report_md']}")
    print(f"[demo] summary: {cfg.output_dir / 'summary.json'}")


def main(argv: list[str]) -> int:
    from nla.stages import datagen, evaluate, rl, train_ar, train_av
    from nla.train.distributed import make_accelerator

    began = time.time()
    cfg, _ = start_stage(argv, "demo", folder=lambda c, _: c.output_dir)
    t0 = time.time()
    path = ModelSource.of(cfg.model).resolve(cfg.model.model)
    print(f"[demo] model {cfg.model.model} -> {path} (resolved in {time.time() - t0:.1f}s)")
    acc = make_accelerator(cfg.run.device)
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args, **kw):
        start = time.time()
        out = fn(*args, **kw)
        timings[name] = round(time.time() - start, 1)
        return out

    if cfg.data.paired_model:
        try:
            out = cross_demo(cfg, acc, timed)
        finally:
            acc.end_training()
        cross_report(cfg, {**out, "wall_s": round(time.time() - began, 1), "stage_seconds": timings})
        return 0
    try:
        _banner("1/6 datagen: activations + teacher explanations")
        data = timed("datagen", datagen.run, cfg)
        print(datagen.describe(data))

        _banner("2/6 AR warm start (explanation -> activation), with a shuffled-target control")
        ar = timed("train_ar", train_ar.run, cfg, acc)
        control = timed("train_ar_control", train_ar.run_shuffled_control, cfg, acc, max(10, cfg.ar.ar_steps // 5))
        print(train_ar.format_table(ar, control))
        oracle = None
        if not cfg.eval.oracle_ar:  # the user's own oracle AR stands in for the demo's
            _banner("2b/6 context-oracle AR (reads the raw context instead of explanations: the ceiling)")
            oracle = timed(
                "train_ar_oracle",
                train_ar.run,
                cfg.replace(ar_text="context", ar_steps=cfg.ar.ar_oracle_steps or cfg.ar.ar_steps),
                acc,
            )
            print(train_ar.format_table(oracle))

        _banner("3/6 AV warm start (activation -> explanation), with the shuffled-vector control")
        av = timed("train_av", train_av.run, cfg, acc)
        print(train_av.describe(av))

        _banner("4/6 eval of the SFT pair on held-out documents")
        eval_cfg, rl_cfg = eval_configs(cfg, oracle)
        sft_pair = {f"{role}_checkpoint": str(cfg.output_dir / role / "final") for role in ("av", "ar")}
        sft_report = timed(
            "eval_sft",
            evaluate.run,
            eval_cfg.replace(**sft_pair),
            evaluate.EvalArgs(),
            report_dir=cfg.output_dir / "eval_sft",
        )

        _banner("5/6 joint RL: GRPO on the AV, live AR as reward, AR co-trained")
        rl_out = timed("rl", rl.run, cfg, acc)
        print(rl.describe(rl_out))

        _banner("6/6 eval of the RL checkpoint on the same held-out documents")
        rl_args = evaluate.EvalArgs(checkpoint=rl_out["checkpoint"])
        rl_cfg = rl_cfg.replace(av_checkpoint=None, ar_checkpoint=None)  # the RL checkpoint's own pair
        rl_report = timed("eval_rl", evaluate.run, rl_cfg, rl_args, report_dir=cfg.output_dir / "eval_rl")
    finally:
        acc.end_training()

    report(
        cfg,
        {
            "sft": sft_report,
            "rl": rl_report,
            "checkpoint": rl_out["checkpoint"],
            "wall_s": round(time.time() - began, 1),
            "stage_seconds": timings,
            "datagen": {k: data[k] for k in ("rows", "norms", "suggested_injection_scale") if k in data},
            "ar_sft": {k: v for k, v in ar.items() if k != "history"},
            "ar_shuffled_control": control,
            "ar_oracle": oracle,
            "av_sft": {k: v for k, v in av.items() if k != "samples"},
            "rl_training": rl_out,
            "control_margin": {"sft": control_margin(sft_report), "rl": control_margin(rl_report)},
            "lookup_margin": {"sft": lookup_margin(sft_report), "rl": lookup_margin(rl_report)},
        },
    )
    return 0
