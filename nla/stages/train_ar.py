"""`nla train-ar`: supervised warm start of the AR (explanation text -> activation of block K).

    nla train-ar --config configs/embedded.yaml [--ar_steps 60] [--resume never]
    accelerate launch --multi_gpu --num_processes 8 -m nla.cli train-ar --config configs/x.yaml

Reads `<data_dir>/ar_sft.parquet` (train) and `<data_dir>/val.parquet`; writes checkpoints to
`<output_dir>/ar/checkpoint-*/ar/` and the last one to `<output_dir>/ar/final/ar/`. Loss: mean
MSE_nrm (both vectors at norm mse_scale = sqrt(d) by default, so MSE = 2(1 - cos)). FVE is the
strict one: Var comes from the *training* targets and is stored in the sidecar for eval.

Controls, because a content-blind AR can look good: at every validation the same AR reads empty
text, other rows' explanations, and word salad; `--ar_shuffle_targets true` (or
`--shuffled_control true`, which also trains the real one) trains on targets permuted across rows,
into `<output_dir>/ar_shuffled_targets/` so a control never becomes the AR later stages load.

The trainer is `nla/train/ar_sft.py` on the shared loop (`train/trainer.py`); this module loads the
AR and its rows, wires the checkpoint saver and writes the summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nla.core import seeds
from nla.core.config import ConfigError, NLAConfig
from nla.core.sidecar import SidecarError
from nla.core.tracking import Tracker
from nla.data.paired import check_paired, paired_dir
from nla.data.splits import Split, derangement, load_split, split_path
from nla.models.ar import build_ar, load_ar, model_meta, save_ar
from nla.models.sources import ModelSource
from nla.stages.stage import seed_everything, start_stage
from nla.train.ar_sft import ARTrainer, load_rows
from nla.train.checkpoint import Saver, load_checkpoint_state, publish_final, start_from, training_fingerprint
from nla.train.distributed import make_accelerator
from nla.train.loop import schedule
from nla.train.trainer import Cadence

CONTROL_DIR = "ar_shuffled_targets"
ORACLE_DIR = "ar_oracle"  # the context-oracle AR (--ar_text context): never the AR later stages load


@dataclass
class TrainARArgs:
    shuffled_control: bool = field(
        default=False,
        metadata={
            "help": "After the real AR, also train a shuffled-target control with the same settings and print both."
        },
    )


def _load_data(cfg: NLAConfig, tokenizer) -> tuple[Split, Split]:
    train = load_split(split_path(cfg.data_dir, "ar_sft"))
    val = load_split(split_path(cfg.data_dir, "val"), max_rows=cfg.ar.ar_val_rows, seed=cfg.run.seed)
    layer = train.meta.layer_index
    if cfg.model.layer is not None and cfg.model.layer != layer:
        raise ConfigError(
            f"--layer {cfg.model.layer} but {train.path} holds activations of block {layer}; "
            "drop --layer or regenerate the data with `nla datagen`."
        )
    for split in (train, val):
        if len(split) == 0:
            raise ConfigError(
                f"{split.path} has no rows: give that split a share of --split_fractions and enough "
                "documents (--max_docs), then rerun `nla datagen`."
            )
        split.meta.verify(tokenizer, where=str(split.path))
        if split.meta.layer_index != layer:
            raise SidecarError(
                f"{split.path}: layer {split.meta.layer_index} but ar_sft has layer {layer}; "
                "regenerate the data together."
            )
    return train, val


def output_root(cfg: NLAConfig) -> Path:
    """Where this AR's checkpoints go: <output_dir>/ar, or the control's or the oracle's folder; for
    model B of paired data (--ar_model) the same names ending in _b."""
    name = CONTROL_DIR if cfg.ar.ar_shuffle_targets else ORACLE_DIR if cfg.ar.ar_text == "context" else "ar"
    return cfg.output_dir / (f"{name}_b" if cfg.ar.ar_model else name)


def cross_config(cfg: NLAConfig) -> NLAConfig:
    """With --ar_model B: the same run reading B's paired dataset (<data_dir>/paired) with B as the
    model; refuses paired data of another model or layer (one line)."""
    if not cfg.ar.ar_model:
        return cfg
    folder = paired_dir(cfg.data_dir)
    record = check_paired(split_path(folder, "ar_sft"), cfg.ar.ar_model, cfg.ar.ar_layer)
    return cfg.replace(model=cfg.ar.ar_model, layer=record["layer_b"], data_dir=str(folder))


def run(cfg: NLAConfig, accelerator=None) -> dict[str, Any]:
    """Train the AR (or, with ar_shuffle_targets, the shuffled-target control); return key numbers."""
    seed_everything(cfg.run.seed)  # run() called directly (demo, tests) is as reproducible as the CLI
    acc = accelerator or make_accelerator(cfg.run.device)
    cfg = cross_config(cfg)
    control, oracle = cfg.ar.ar_shuffle_targets, cfg.ar.ar_text == "context"
    root = output_root(cfg)
    source = ModelSource.of(cfg.model)
    model_path = source.resolve(cfg.model.model)
    tokenizer = source.tokenizer(model_path)
    train_split, val_split = _load_data(cfg, tokenizer)
    fingerprint = training_fingerprint(
        cfg, "ar", processes=acc.num_processes, dataset_id=train_split.meta.extra.get("dataset_id")
    )
    resume = start_from(cfg.run.resume, root, fingerprint, acc.is_main_process)
    if resume is not None:
        ar, tokenizer = load_ar(resume, acc.device, cfg.model.dtype, trainable=True, source=source)
    else:
        ar = build_ar(
            model_path,
            train_split.meta.layer_index,
            cfg.ar.ar_lora_r,
            cfg.model.dtype,
            acc.device,
            train_split.meta.ar_template,
            cfg.model.trust_remote_code,
        )
    train_split.meta.verify(tokenizer, d_model=ar.d_model, where=str(train_split.path))
    train = load_rows(train_split, ar, tokenizer, check_prompts=True, ar_text=cfg.ar.ar_text)
    val = load_rows(val_split, ar, tokenizer, ar_text=cfg.ar.ar_text)
    if len(train.ids) < 1:
        raise ConfigError(
            f"{train_split.path}: no usable rows (need an explanation and a prompt <= {ar.max_length} tokens)."
        )
    if control:  # the control: every row learns another row's target, so text carries no information
        train.targets = train.targets[derangement(len(train.targets), cfg.run.seed + seeds.SHUFFLED_TARGETS)]
    opt = torch.optim.AdamW(ar.trainable_parameters(), lr=cfg.ar.ar_lr, weight_decay=0.0)
    sched = schedule(opt, cfg.ar.ar_steps)
    start: dict[str, Any] = {}
    if resume is not None:
        start = load_checkpoint_state(resume, {"ar_optimizer": opt, "ar_scheduler": sched})
    model, opt = acc.prepare(ar, opt)
    tracker = Tracker(
        cfg,
        "train-ar-shuffled-targets" if control else "train-ar-oracle" if oracle else "train-ar",
        is_main=acc.is_main_process,
    )
    tracker.forget_after(int(start.get("step", 0)))  # steps after the checkpoint are trained (and logged) again

    trainer = ARTrainer(cfg.ar, cfg.run.seed, ar, model, tokenizer, train, val, acc, opt, sched, start)

    save = _saver(cfg, trainer, train_split, root, {"fingerprint": fingerprint}, acc, resume)
    began = time.time()
    cadence = Cadence(cfg.ar.ar_steps, cfg.logging.log_every, cfg.ar.ar_eval_every, cfg.ar.ar_save_every)
    result = trainer.fit(int(start.get("step", 0)), cadence, tracker, save, cfg.logging.progress, acc.is_main_process)
    final = result.val
    checkpoint = publish_final(save.last, root) if acc.is_main_process else root / "final"
    acc.wait_for_everyone()
    summary = _summary(final, trainer, result.step, control, checkpoint, time.time() - began)
    tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    tracker.finish()
    return summary


def _saver(cfg: NLAConfig, trainer: ARTrainer, train_split: Split, root: Path, state, acc, resume) -> Saver:
    """The checkpoint callback: the AR with a sidecar recording its Var, control and training."""
    control = cfg.ar.ar_shuffle_targets

    def write(tmp: Path, step: int) -> None:
        training = {
            "stage": "train-ar",
            "step": step,
            "ar_steps": cfg.ar.ar_steps,
            "ar_lr": cfg.ar.ar_lr,
            "ar_batch_size": cfg.ar.ar_batch_size,
            "ar_grad_accum": cfg.ar.ar_grad_accum,
            "num_processes": acc.num_processes,
            "dtype": cfg.model.dtype,
            "seed": cfg.run.seed,
            "train_rows": len(trainer.train.ids),
            "dataset": str(train_split.path),
            "dataset_id": train_split.meta.extra.get("dataset_id"),
        }
        extra = {
            "ar_target_variance": trainer.var,
            "control": "shuffled_targets" if control else None,
            "ar_text": cfg.ar.ar_text,
            "training": training,
            **({"paired": train_split.meta.extra["paired"]} if cfg.ar.ar_model else {}),
        }
        meta = model_meta(trainer.ar, train_split.meta, cfg.model.model, trainer.scale, extra)
        save_ar(trainer.ar, tmp / "ar", meta, trainer.tok)

    return Saver(root, write, trainer.saved_optimizers, state, acc, last=resume)


def _summary(
    final: dict[str, float], trainer: ARTrainer, step: int, control: bool, checkpoint: Path, wall_s: float
) -> dict[str, Any]:
    """The numbers the demo prints: strict and lenient val FVE, the text controls, throughput."""
    return {
        "val_fve_nrm": final.get("ar/val_fve_nrm"),
        "val_fve_vs_mean_pred": final.get("ar/val_fve_vs_mean_pred"),
        "val_cos": final.get("ar/val_cos"),
        "val_fve_centered": final.get("ar/val_fve_centered"),
        "val_fve_floor": final.get("ar/val_fve_floor"),
        "controls": {
            "empty_text": final.get("ar/val_fve_nrm_empty_text"),
            "random_text": final.get("ar/val_fve_nrm_random_text"),
            "word_salad": final.get("ar/val_fve_nrm_word_salad"),
        },
        "shuffled_targets": control,
        "ar_text": trainer.cfg.ar_text,
        "checkpoint": str(checkpoint),
        "steps": step,
        "rows_per_s": trainer.rows_seen / max(trainer.train_time, 1e-9),
        "wall_s": round(wall_s, 1),
        "skipped_steps": trainer.skipped,
        "train_rows": len(trainer.train.ids),
        "val_rows": len(trainer.val.texts),
        "dropped_rows": trainer.train.dropped + trainer.val.dropped,
        "target_variance": trainer.var,
    }


def run_shuffled_control(cfg: NLAConfig, accelerator=None, steps: int | None = None) -> dict[str, Any]:
    """The same training on targets permuted across rows (into <output_dir>/ar_shuffled_targets)."""
    return run(cfg.replace(ar_shuffle_targets=True, **({"ar_steps": steps} if steps is not None else {})), accelerator)


def format_table(real: dict[str, Any], control: dict[str, Any] | None = None) -> str:
    """The headline: val fve_nrm of the real AR next to its controls (all strict FVE, training Var)."""
    first = (
        "shuffled-target AR, real text"
        if real["shuffled_targets"]
        else "raw context (oracle AR)"
        if real.get("ar_text") == "context"
        else "real explanations"
    )
    rows = [
        (first, real["val_fve_nrm"]),
        ("empty text", real["controls"]["empty_text"]),
        ("other rows' explanations", real["controls"]["random_text"]),
        ("word salad", real["controls"]["word_salad"]),
    ]
    if control is not None:
        rows.append(("shuffled-target control AR", control["val_fve_nrm"]))
    rows.append(("floor: constant mean guess", real.get("val_fve_floor")))
    lines = ["val fve_nrm (strict: 1 - MSE/Var, Var of training targets)"]
    lines += [f"  {name:<28} {'n/a' if v is None else f'{v:+.3f}'}" for name, v in rows]
    lines.append(
        f"  (lenient fve_vs_mean_pred of the real AR: {real['val_fve_vs_mean_pred']:+.3f})"
        if real["val_fve_vs_mean_pred"] is not None
        else ""
    )
    return "\n".join(lines).rstrip()


def main(argv: list[str]) -> int:
    cfg, (args,) = start_stage(argv, "train-ar", extra=[TrainARArgs], folder=lambda c, _: output_root(c))
    acc = make_accelerator(cfg.run.device)
    summary = run(cfg, acc)
    control = run_shuffled_control(cfg, acc) if args.shuffled_control and not cfg.ar.ar_shuffle_targets else None
    if control is not None:
        summary["controls"]["shuffled_targets"] = control["val_fve_nrm"]
    if acc.is_main_process:
        print(
            f"[train-ar] {summary['steps']} steps, {summary['rows_per_s']:.1f} rows/s, {summary['wall_s']}s; "
            f"checkpoint {summary['checkpoint']}"
        )
        print(format_table(summary, control))
    acc.end_training()
    return 0
