"""`nla rl`: joint RL of the warm-started AV and AR (GRPO on the AV, live AR as reward).

    nla rl --config configs/embedded.yaml --output_dir runs/demo
    accelerate launch --multi_gpu --num_processes 8 -m nla.cli rl --config configs/qwen2.5-7b-l20.yaml

Reads `<data_dir>/rl.parquet` (vectors) and `val.parquet` (held-out reward before the first step
and at the end, `--rl_val_rows`), the SFT AV
(`--av_checkpoint`, default `<output_dir>/av/final`) and AR (`--ar_checkpoint`, default
`<output_dir>/ar/final`). Loads ONE base model with three adapters (av, av_ref, ar; see
`nla/train/grpo.py`) and writes `<output_dir>/rl/checkpoint-N/{av,ar}/` and `<output_dir>/rl/final`.
Each process generates rollouts for its share of every global batch; LoRA grads are averaged.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from nla.core.claims import Row
from nla.core.config import ConfigError, NLAConfig
from nla.core.rewards import describe_reward, reward_record
from nla.core.sidecar import MODEL_META, write_meta
from nla.core.tracking import Tracker
from nla.data.splits import load_split, split_path
from nla.models.ar import attach_to_shared_base, mse_scale_of, read_ar_meta, save_shared_ar
from nla.models.av import Verbalizer, injection_scale_of, load_av_model, prompt_ids, read_av_meta
from nla.models.backbone import text_config
from nla.models.engines import cpu_share, make_engine
from nla.models.pair import check_pair, resolve_paths, strict_variance
from nla.models.sources import ModelSource
from nla.stages.plots import plot_rl_curve, rl_curve_points
from nla.stages.stage import seed_everything, start_stage
from nla.train.checkpoint import (
    Saver,
    load_checkpoint_state,
    publish_final,
    start_from,
    training_fingerprint,
)
from nla.train.distributed import local_processes, make_accelerator, rank_share
from nla.train.grpo import AR, AR_REF, AV, AV_REF, HeldOut, JointTrainer, RLRows, adapter_parameters
from nla.train.loop import restore_skips, schedule
from nla.train.trainer import Cadence


def sft_paths(cfg: NLAConfig) -> tuple[Path, Path]:
    """The SFT AV and AR RL starts from: --av_checkpoint/--ar_checkpoint, else the run's own finals."""
    given = {"av": cfg.av.av_checkpoint, "ar": cfg.ar.ar_checkpoint}
    for role, path in given.items():
        if path is None and not (cfg.output_dir / role / "final").is_dir():
            raise ConfigError(
                f"no SFT {role.upper()} at {cfg.output_dir / role / 'final'}: run `nla train-{role}` first "
                f"or pass --{role}_checkpoint DIR."
            )
    paths = resolve_paths(
        av=given["av"] or cfg.output_dir / "av" / "final", ar=given["ar"] or cfg.output_dir / "ar" / "final"
    )
    return paths.av, paths.ar


def load_joint(cfg: NLAConfig, sft_av: Path, sft_ar: Path, resume: Path | None, device, source: ModelSource):
    """One base model (from `source`) + adapters av (trainable), av_ref (frozen SFT AV), ar (trainable)
    + AR head, and, when the held-out check is on, ar_ref (the frozen SFT AR + its head) to score it."""
    av_meta = read_av_meta(sft_av)
    if not (sft_av / "adapter_config.json").is_file():
        raise ConfigError(
            f"{sft_av} is a full-weight AV; joint RL shares one base model and needs LoRA adapters (av_lora_r > 0)."
        )
    tokenizer = source.tokenizer(av_meta.base_model)
    av_src = resume / "av" if resume else sft_av
    ar_src = resume / "ar" if resume else sft_ar
    model = load_av_model(av_src, av_meta, cfg.model.dtype, is_trainable=True, source=source, adapter_name=AV)
    model.load_adapter(str(sft_av), adapter_name=AV_REF, is_trainable=False)
    ar = attach_to_shared_base(model, ar_src, tokenizer, adapter_name=AR, trainable=True)
    sft_ar_model = None
    if cfg.rl.rl_val_rows > 0:  # adding an adapter draws LoRA init from the RNG: fork it so training is unchanged
        with torch.random.fork_rng(devices=[]):
            sft_ar_model = attach_to_shared_base(model, sft_ar, tokenizer, adapter_name=AR_REF, trainable=False)
    av_meta.verify(tokenizer, d_model=text_config(model.config).hidden_size, where=str(sft_av / MODEL_META))
    # the one pair check (nla verbalize/eval too)
    check_pair(av_meta, ar, tokenizer, tokenizer, where=f"AV {sft_av} + AR {sft_ar}")
    model.to(device)
    ar.to(device)
    if sft_ar_model is not None:
        sft_ar_model.to(device)
    verbalizer = Verbalizer(
        model, tokenizer, av_meta, injection_scale_of(av_meta, str(sft_av)), cfg.rl.rl_max_new_tokens
    )
    return model, tokenizer, verbalizer, ar, av_meta, sft_ar_model


def held_out_rows(cfg: NLAConfig, acc) -> HeldOut | None:
    """This process's share of the first `rl_val_rows` val rows (None: off, or no val rows)."""
    path = split_path(cfg.data_dir, "val")
    if cfg.rl.rl_val_rows <= 0 or not path.is_file():
        return None
    val = load_split(path, max_rows=cfg.rl.rl_val_rows, seed=cfg.run.seed)
    if len(val) == 0:
        return None
    if len(val) < acc.num_processes:
        raise ConfigError(
            f"{path} has {len(val)} rows for {acc.num_processes} processes; pass --rl_val_rows 0 to skip "
            "the held-out reward."
        )
    return HeldOut(rank_share(val.vectors, acc).to(acc.device), rank_share(claim_rows(val), acc))


def claim_rows(split) -> list[Row]:
    """What each row's claims are checked against: its context, and the model's next token where
    datagen recorded it."""
    n = len(split)
    contexts = split.columns.get("detokenized_text_truncated") or [""] * n
    nexts = split.columns.get("model_next_token") or [None] * n
    return [Row(c or "", t) for c, t in zip(contexts, nexts)]


def _short(values: dict[str, float] | None) -> dict[str, float] | None:
    return {k.removeprefix("rl/val_"): v for k, v in values.items()} if values else None


def build_trainer(cfg: NLAConfig, data, sft_av: Path, sft_ar: Path, resume: Path | None, acc):
    """The models (from the SFT pair, or `resume`), their optimizers and schedules, as a JointTrainer
    restored to `resume`'s state -> (trainer, state {step, cursor, ...}, av_meta, ar_meta)."""
    rc, source = cfg.rl, ModelSource.of(cfg.model)
    model, tokenizer, verbalizer, ar, av_meta, sft_ar_model = load_joint(
        cfg, sft_av, sft_ar, resume, acc.device, source
    )
    if rc.rl_claim_reward and not verbalizer.format.checked_types:
        raise ConfigError(
            f"--rl_claim_reward {rc.rl_claim_reward}: the AV writes the {verbalizer.format.name} format, whose "
            "claims no rule checks; the grounded term needs a checkable format (teacher extractive)."
        )
    data.meta.verify(tokenizer, d_model=text_config(model.config).hidden_size, where=str(data.path))
    if data.meta.layer_index != av_meta.layer_index:
        raise ConfigError(
            f"{data.path} holds layer {data.meta.layer_index} but the AV was trained on layer {av_meta.layer_index}."
        )
    ar_meta = read_ar_meta(sft_ar)
    scale = mse_scale_of(ar)
    var, _ = strict_variance(ar, data.vectors, scale)
    av_params, ar_params = adapter_parameters(model, AV), adapter_parameters(model, AR) + [ar.head.weight]
    av_opt = torch.optim.AdamW(av_params, lr=rc.rl_av_lr, weight_decay=0.0)
    ar_opt = torch.optim.AdamW(ar_params, lr=rc.rl_ar_lr, weight_decay=0.0)
    av_sched, ar_sched = schedule(av_opt, rc.rl_steps, "constant"), schedule(ar_opt, rc.rl_steps, "constant")
    engine_model = (
        source.resolve(av_meta.base_model) if rc.rl_rollout_engine == "vllm" else None
    )  # the folder vllm loads
    longest = len(prompt_ids(tokenizer, av_meta)) + rc.rl_max_new_tokens  # the engine's context length
    engine = make_engine(
        rc.rl_rollout_engine,
        verbalizer,
        engine_model,
        rc.rl_vllm_python,
        cfg.model.dtype,
        cfg.run.seed + acc.process_index,
        max_model_len=longest,
        memory_gb=rc.rl_vllm_memory_gb,
        log_path=cfg.output_dir / f"vllm_worker_{acc.process_index}.log",
        sync=rc.rl_engine_sync,
        adapter=AV,
        cpus=cpu_share(acc.local_process_index, local_processes(acc)) if rc.rl_rollout_engine == "vllm" else None,
        rank=acc.process_index if acc.num_processes > 1 else None,
    )
    trainer = JointTrainer(
        model,
        verbalizer,
        ar,
        tokenizer,
        rc,
        scale,
        var,
        av_opt,
        ar_opt,
        av_sched,
        ar_sched,
        acc,
        sft_ar=sft_ar_model,
        engine=engine,
    )
    state: dict[str, Any] = {"step": 0, "cursor": 0}
    if resume is not None:
        state = load_checkpoint_state(resume, trainer.saved_optimizers())
        restore_skips(state.get("skipped"), trainer.av_step, trainer.ar_step)
    return trainer, state, av_meta, _with(ar_meta, {"ar_target_variance": var})


def checkpoint_writer(
    trainer: JointTrainer, root: Path, av_meta, ar_meta, state: dict[str, Any], acc, resume: Path | None
) -> Saver:
    """The run's `Saver`: the AV and AR as two folders a later stage loads like SFT ones, plus the
    training state; `state` supplies what every checkpoint repeats (fingerprint, SFT paths); until the
    first save, the newest checkpoint is the one resumed."""
    model, tokenizer = trainer.model, trainer.tokenizer

    def write(tmp: Path, step: int) -> None:
        trained = av_meta.extra.get("training") or {}  # the SFT AV's: the format it writes stays on record
        training = {
            "stage": "rl",
            "training": {
                "stage": "rl",
                "step": step,
                "sft_av": state["sft_av"],
                "sft_ar": state["sft_ar"],
                "explanation_format": trained.get("explanation_format"),
                "reward": reward_record(trainer.cfg),
            },
        }
        model.save_pretrained(str(tmp), selected_adapters=[AV])  # -> tmp/av/adapter_*
        tokenizer.save_pretrained(tmp / "av")
        write_meta(tmp / "av" / MODEL_META, _with(av_meta, training))
        save_shared_ar(model, trainer.ar, tmp / "ar", _with(ar_meta, training), AR, tokenizer)

    return Saver(root, write, trainer.saved_optimizers, state, acc, last=resume)


def output_root(cfg: NLAConfig) -> Path:
    """Where RL's checkpoints go: <output_dir>/rl, or the shuffle control's folder."""
    return cfg.output_dir / ("rl_shuffle_control" if cfg.rl.rl_shuffle_control else "rl")


def run(cfg: NLAConfig, accelerator=None) -> dict[str, Any]:
    seed_everything(cfg.run.seed)  # run() called directly (demo, tests) is as reproducible as the CLI
    acc = accelerator or make_accelerator(cfg.run.device)
    rc = cfg.rl
    root = output_root(cfg)
    data = load_split(split_path(cfg.data_dir, "rl"))
    if len(data) < acc.num_processes * rc.rl_batch_size:
        raise ConfigError(
            f"{data.path} has {len(data)} rows, fewer than one step's {acc.num_processes * rc.rl_batch_size}: "
            "give the rl split a share of --split_fractions and enough documents, then rerun `nla datagen`."
        )
    sft_av, sft_ar = sft_paths(cfg)
    fingerprint = training_fingerprint(
        cfg,
        "rl",
        processes=acc.num_processes,
        sft_av=str(sft_av),
        sft_ar=str(sft_ar),
        dataset_id=data.meta.extra.get("dataset_id"),
    )
    resume = start_from(cfg.run.resume, root, fingerprint, acc.is_main_process)
    trainer, state, av_meta, ar_meta = build_trainer(cfg, data, sft_av, sft_ar, resume, acc)
    try:
        return _train(cfg, acc, trainer, state, av_meta, ar_meta, data, root, sft_av, sft_ar, fingerprint, resume)
    finally:
        trainer.engine.close()


def _train(
    cfg: NLAConfig,
    acc,
    trainer: JointTrainer,
    state: dict[str, Any],
    av_meta,
    ar_meta,
    data,
    root: Path,
    sft_av: Path,
    sft_ar: Path,
    fingerprint: dict[str, Any],
    resume: Path | None,
) -> dict[str, Any]:
    rc = cfg.rl
    tracker = Tracker(cfg, root.name, is_main=acc.is_main_process)
    tracker.forget_after(int(state["step"]))  # steps after the checkpoint are trained (and logged) again
    val = held_out_rows(cfg, acc)
    trainer.rows = RLRows(data.vectors, claim_rows(data), cfg.run.seed, int(state["cursor"]), val)
    trainer.val_start = state.get("val_start")  # a resumed run still reports where it started
    fixed = {"sft_av": str(sft_av), "sft_ar": str(sft_ar), "fingerprint": fingerprint}
    save = checkpoint_writer(trainer, root, av_meta, ar_meta, fixed, acc, resume)
    began = time.time()
    cadence = Cadence(rc.rl_steps, cfg.logging.log_every, rc.rl_val_every, rc.rl_save_every)
    result = trainer.fit(
        int(state["step"]), cadence, tracker, save, cfg.logging.progress, acc.is_main_process, val is not None
    )
    history = result.history
    final = root / "final"
    if acc.is_main_process and save.last is not None:
        final = publish_final(save.last, root)
    summary: dict[str, Any] = {
        "steps": rc.rl_steps,
        "checkpoint": str(final),
        "wall_s": round(time.time() - began, 1),
        "rollout_engine": trainer.engine.name,
        "reward": reward_record(rc),
    }
    if hasattr(trainer.engine, "start_s"):
        summary["engine_start_s"] = round(trainer.engine.start_s, 1)
        summary["engine_sync"] = trainer.engine.sync_mode
        summary["sync_bytes"] = trainer.engine.sync_bytes
    if history:
        first, tail = history[0], history[-max(1, len(history) // 5) :]
        summary["reward_first"] = first["rl/reward_mean"]
        summary["reward_last"] = sum(h["rl/reward_mean"] for h in tail) / len(tail)
        summary["seconds_per_step"] = summary["wall_s"] / max(1, len(history))
    if val is not None:
        val_end = result.val
        summary["val_start"], summary["val"] = _short(trainer.val_start), _short(val_end)
        tracker.summary(val_end)
        if acc.is_main_process:
            curve = rl_curve_points(tracker.jsonl, root.name)
            summary["val_curve"] = curve
            summary["val_curve_png"] = plot_rl_curve(curve, root / "held_out_fve_by_step.png")
    tracker.finish()
    return summary


def _with(meta, extra: dict[str, Any]):
    from dataclasses import replace

    return replace(meta, extra={**meta.extra, **extra})


def describe(s: dict[str, Any]) -> str:
    nan = float("nan")
    start, end = s.get("val_start") or {}, s.get("val") or {}
    return (
        f"[rl] {s['steps']} steps in {s['wall_s']}s; training reward {s.get('reward_first', nan):.3f} -> "
        f"{s.get('reward_last', nan):.3f}; held-out reward {start.get('reward_mean', nan):.3f} -> "
        f"{end.get('reward_mean', nan):.3f}, fve_nrm {start.get('fve_nrm', nan):.3f} -> {end.get('fve_nrm', nan):.3f} "
        f"(live AR, sampled as in training; SFT AR: {start.get('fve_nrm_sft_ar', nan):.3f} -> "
        f"{end.get('fve_nrm_sft_ar', nan):.3f}); checkpoint {s['checkpoint']}"
        + (f"\n[rl] reward: {describe_reward(s['reward'])}" if (s.get("reward") or {}).get("claim_reward") else "")
    )


def main(argv: list[str]) -> int:
    cfg, _ = start_stage(argv, "rl", folder=lambda c, _: output_root(c))
    acc = make_accelerator(cfg.run.device)
    try:
        s = run(cfg, acc)
        if acc.is_main_process:
            print(describe(s))
    finally:
        acc.end_training()
    return 0
