"""`nla train-av`: supervised warm start of the AV (activation -> explanation).

    nla train-av --config configs/embedded.yaml [--av_steps 200 --av_lr 2e-4 --resume never]
    accelerate launch --multi_gpu --num_processes 8 -m nla.cli train-av --config configs/x.yaml

Reads `<data_dir>/av_sft.parquet` and `<data_dir>/val.parquet` (from `nla datagen`), puts LoRA
(or, with av_lora_r 0, full fine-tuning) on the target model, and trains next-token loss on the
response only, with each row's activation injected at the marker. Checkpoints go to
`<output_dir>/av/checkpoint-*/av/` (adapter or weights + tokenizer + `nla_meta.yaml`), the last
one to `<output_dir>/av/final/`. `--resume auto` continues from the newest checkpoint with the
same data order (the order is a pure function of seed and step).

The control, at every held-out check: the same val rows with their vectors permuted across rows. An AV that
reads the vector has a clearly lower loss on the real pairing (`av/shuffle_gap` > 0); one that
only learned the style of the explanations does equally well on both.

Why a plain Accelerate loop and not trl's SFTTrainer: every row carries an activation vector that
must reach the embedding hook in the same forward as its tokens. SFTTrainer's collator and
dataloader drop unknown columns and reorder/pack rows, so the vectors would need a custom
collator, a `compute_loss` override and a hook fed from inside it, which is most of a trainer
anyway. `nla/train/av_sft.py`'s trainer is ~150 lines on the shared loop (`train/trainer.py`),
shares `response_logprobs` with RL, and makes the data order a function of (seed, step), which is
what exact resume needs. This module only loads the model and data, wires the checkpoint saver and
writes the summary.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from nla.core import claims
from nla.core.config import ConfigError, NLAConfig
from nla.core.sidecar import dataset_meta_path, read_meta
from nla.core.tracking import Tracker
from nla.data.splits import load_split, split_path
from nla.models.av import (
    check_prompts,
    load_av_model,
    make_av_meta,
    prompt_ids,
    read_av_meta,
    save_av,
)
from nla.models.lora import apply_lora, trainable_parameters
from nla.models.sources import ModelSource
from nla.stages.stage import seed_everything, start_stage
from nla.train.av_sft import AVData, AVTrainer
from nla.train.checkpoint import Saver, load_checkpoint_state, publish_final, start_from, training_fingerprint
from nla.train.distributed import make_accelerator
from nla.train.loop import schedule
from nla.train.trainer import Cadence


def load_data(cfg: NLAConfig, tokenizer, d_model: int) -> AVData:
    """Both splits, verified against the live tokenizer; the injection scale (config wins)."""
    train = load_split(split_path(cfg.data_dir, "av_sft"))
    val = load_split(split_path(cfg.data_dir, "val"), max_rows=cfg.av.av_val_rows, seed=cfg.run.seed)
    for split in (train, val):
        split.meta.verify(tokenizer, d_model=d_model, where=str(split.path))
        check_prompts(split.column("prompt"), train.meta, str(split.path))
    if len(train) == 0 or len(val) == 0:
        raise ConfigError(
            f"{cfg.data_dir}: av_sft and val need at least one row each; run `nla datagen` with more documents."
        )
    if cfg.model.layer is not None and cfg.model.layer != train.meta.layer_index:
        raise ConfigError(
            f"layer={cfg.model.layer} but {train.path} was extracted at layer {train.meta.layer_index}; "
            "drop --layer or regenerate the data."
        )
    scale = cfg.av.injection_scale or train.meta.extra.get("suggested_injection_scale")
    if not scale:
        raise ConfigError(
            f"no injection scale: set injection_scale in the config, or regenerate {train.path} "
            "(its sidecar lacks suggested_injection_scale)."
        )
    return AVData(train, val, prompt_ids(tokenizer, train.meta), float(scale))


def build_model(cfg: NLAConfig, base_path: str, resume_from: Path | None):
    """The trainable AV: LoRA on the base (or full weights), from the checkpoint when resuming."""
    source = ModelSource.of(cfg.model)
    if resume_from is None:
        return apply_lora(source.causal_lm(base_path, cfg.model.dtype), cfg.av.av_lora_r)
    av_dir = resume_from / "av"
    model = load_av_model(av_dir, read_av_meta(av_dir), cfg.model.dtype, is_trainable=True, source=source)
    return model if cfg.av.av_lora_r > 0 else apply_lora(model, 0)


def run(cfg: NLAConfig, accelerator=None) -> dict[str, Any]:
    """Train the AV; returns val loss real vs shuffled, samples, the final checkpoint and speed."""
    start = time.time()
    seed_everything(cfg.run.seed)
    acc = accelerator or make_accelerator(cfg.run.device)
    source = ModelSource.of(cfg.model)
    base_path = source.resolve(cfg.model.model)
    tokenizer = source.tokenizer(base_path)
    train_path = split_path(cfg.data_dir, "av_sft")
    dataset_id = read_meta(dataset_meta_path(train_path)).extra.get("dataset_id") if train_path.is_file() else None
    fingerprint = training_fingerprint(cfg, "av", processes=acc.num_processes, dataset_id=dataset_id)
    resume_from = start_from(cfg.run.resume, cfg.output_dir / "av", fingerprint, acc.is_main_process)
    model = build_model(cfg, base_path, resume_from)
    d_model = model.get_input_embeddings().weight.shape[-1]
    data = load_data(cfg, tokenizer, d_model)
    provenance = {
        "dataset": str(data.train.path),
        "dataset_id": data.train.meta.extra.get("dataset_id"),
        "steps": cfg.av.av_steps,
        "lr": cfg.av.av_lr,
        "batch_size": cfg.av.av_batch_size,
        "grad_accum": cfg.av.av_grad_accum,
        "seed": cfg.run.seed,
        "dtype": cfg.model.dtype,
        "explanation_format": claims.format_record(data.train.meta.extra),
    }
    meta = make_av_meta(data.train.meta, d_model, cfg.model.model, data.injection_scale, cfg.av.av_lora_r, provenance)
    model.to(acc.device)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=cfg.av.av_lr, weight_decay=0.0)
    scheduler = schedule(optimizer, cfg.av.av_steps)
    start_step, state = 0, {}
    if resume_from is not None:  # after model.to(device): optimizer state follows its params' device
        state = load_checkpoint_state(resume_from, {"av_optimizer": optimizer, "av_scheduler": scheduler})
        start_step = int(state["step"])
    model, optimizer = acc.prepare(model, optimizer)
    tracker = Tracker(cfg, "train-av", is_main=acc.is_main_process)
    tracker.forget_after(start_step)  # steps after the checkpoint are trained (and logged) again
    trainer = AVTrainer(cfg.av, cfg.run.seed, acc, model, tokenizer, meta, data, optimizer, scheduler, tracker, state)

    def write(tmp: Path, step: int) -> None:
        meta.extra["training"]["step"] = step
        save_av(trainer.unwrapped, tokenizer, meta, tmp / "av")
        cfg.save(tmp)

    save = Saver(cfg.output_dir / "av", write, trainer.saved_optimizers, {"fingerprint": fingerprint}, acc, resume_from)
    cadence = Cadence(cfg.av.av_steps, cfg.logging.log_every, cfg.av.av_eval_every, cfg.av.av_save_every)
    result = trainer.fit(
        start_step, cadence, tracker, save, cfg.logging.progress, acc.is_main_process, cfg.av.av_eval_at_start
    )
    final = publish_final(save.last, cfg.output_dir / "av") if acc.is_main_process else None
    ev, first = result.val, result.first_val or {}
    summary = {
        "val_loss": ev["av/val_loss"],
        "val_loss_shuffled": ev["av/val_loss_shuffled"],
        "shuffle_gap": ev["av/shuffle_gap"],
        "val_loss_start": first.get("av/val_loss"),
        "shuffle_gap_start": first.get("av/shuffle_gap"),
        "non_latin_rate": ev.get("av/non_latin_rate"),
        "extraction_fail_rate": ev.get("av/extraction_fail_rate"),
        "samples": [tuple(r) for r in trainer.samples[:3]],
        "checkpoint": str(final) if final else None,
        "injection_scale": data.injection_scale,
        "tokens_per_s": trainer.tokens_per_s,
        "train_s": round(trainer.train_s, 1),
        "steps": cfg.av.av_steps,
        "resumed_from_step": start_step,
        "wall_s": round(time.time() - start, 1),
    }
    tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    tracker.finish()
    return summary


def describe(summary: dict[str, Any]) -> str:
    """A few readable lines: speed, val loss real vs shuffled (the evidence), three samples next to their teacher."""

    def num(key: str, fmt: str) -> str:
        return "-" if summary.get(key) is None else format(summary[key], fmt)

    lines = [
        f"train-av: {summary['steps']} steps, {summary['wall_s']}s wall, {num('train_s', '')}s training "
        f"({num('tokens_per_s', '.0f')} tok/s), injection_scale {num('injection_scale', '.4g')}",
        f"val loss real {num('val_loss', '.4f')} vs shuffled vectors {num('val_loss_shuffled', '.4f')} "
        f"(gap {num('shuffle_gap', '+.4f')}; at step 0: {num('val_loss_start', '.4f')}, gap {num('shuffle_gap_start', '+.4f')}; "
        "gap > 0 means the AV reads the vector)",
        f"greedy samples: non-Latin rate {num('non_latin_rate', '.2f')}, extraction failures {num('extraction_fail_rate', '.2f')}",
    ]
    for context, teacher, av in summary["samples"]:
        lines.append(f"  ...{context[-80:]!r}\n      teacher: {teacher}\n      AV:      {av[:200]}")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    cfg, _ = start_stage(argv, "train-av", folder=lambda c, _: c.output_dir / "av")
    acc = make_accelerator(cfg.run.device)
    summary = run(cfg, acc)
    if acc.is_main_process:
        print(describe(summary))
    acc.end_training()
    return 0
