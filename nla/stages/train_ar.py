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
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nla.core import seeds
from nla.core.config import ARConfig, ConfigError, NLAConfig
from nla.core.metrics import cosine, fve_from_mse, mse_nrm, summarize, target_mean, target_variance
from nla.core.sidecar import SidecarError
from nla.core.templates import ar_prompt, context_tail
from nla.core.tracking import Tracker, progress
from nla.data.splits import Split, derangement, load_split, split_path
from nla.models.ar import ARModel, build_ar, load_ar, model_meta, pad_batch, save_ar
from nla.models.sources import ModelSource
from nla.stages.stage import seed_everything, start_stage
from nla.train.checkpoint import load_checkpoint_state, publish_final, save_checkpoint, start_from, training_fingerprint
from nla.train.distributed import make_accelerator, rank_share
from nla.train.loop import OptimizerStep, restore_skips, row_stream, schedule, skip_counts

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


@dataclass
class ARRows:
    """Rows ready for the AR: prompt token ids (untruncated), raw targets [n, d], explanations."""

    ids: list[list[int]]
    targets: torch.Tensor
    texts: list[str]
    dropped: int = 0  # rows without explanation or with an over-length prompt


def ar_texts(split: Split, ar_text: str = "explanation") -> list[str | None]:
    """What the AR reads for each row: the explanation, or (the oracle) the raw context's tail."""
    if ar_text == "context":
        return [context_tail(c or "") for c in split.column("detokenized_text_truncated")]
    return split.column("explanation")


def load_rows(
    split: Split, ar: ARModel, tokenizer, check_prompts: bool = False, ar_text: str = "explanation"
) -> ARRows:
    """Keep rows with a text and an AR prompt of <= ar.max_length tokens (NaN/inf rows never get
    here: `load_split` leaves them out)."""
    texts = ar_texts(split, ar_text)
    if check_prompts and ar_text == "explanation" and "prompt" in split.columns:
        for stored, text in zip(split.column("prompt")[:8], texts[:8]):
            if text is not None and stored != ar_prompt(text, ar.template):
                raise SidecarError(
                    f"{split.path}: stored AR prompt {stored!r} differs from the template in the sidecar "
                    "(template drift); regenerate the data with `nla datagen`."
                )
    keep = [i for i, t in enumerate(texts) if t is not None]
    ids = ar.token_ids([texts[i] for i in keep], tokenizer)
    fits = [k for k, x in enumerate(ids) if len(x) <= ar.max_length]
    rows = [keep[k] for k in fits]
    return ARRows([ids[k] for k in fits], split.vectors[rows], [texts[i] for i in rows], len(texts) - len(rows))


def word_salad(tokenizer, n: int, seed: int, words: int = 12) -> list[str]:
    """n strings of random whole-word vocabulary tokens: text with no relation to any activation."""
    gen = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [
        w
        for i in range(len(tokenizer))
        if i not in special and (w := tokenizer.decode([i]).strip()).isalpha() and len(w) >= 3
    ]
    vocab = vocab or [tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in special]
    pick = torch.randint(len(vocab), (n, words), generator=gen)
    return [" ".join(vocab[j] for j in row) for row in pick.tolist()]


def evaluate(
    ar: ARModel, tokenizer, val: ARRows, scale: float, var: float, mean: torch.Tensor, batch_size: int, seed: int
) -> dict[str, float]:
    """`ar/val_*` metrics (strict FVE with the training Var) and the three text controls."""
    target = val.targets
    real = summarize(ar.predict(val.texts, tokenizer, batch_size), target, scale, var, mean)
    out = {f"ar/val_{k}": v for k, v in real.items() if k != "mse"} | {"ar/val_loss": real["mse"]}
    empty = ar.predict([""], tokenizer).expand_as(target)  # one prompt: predict it once
    # the floor: the training targets' mean direction for every row (strict FVE is negative below it)
    out["ar/val_fve_floor"] = summarize(mean.unsqueeze(0).expand_as(target), target, scale, var, mean)["fve_nrm"]
    others = [val.texts[i] for i in derangement(len(val.texts), seed).tolist()] if len(val.texts) > 1 else [""]
    salad = word_salad(tokenizer, len(val.texts), seed)
    out["ar/val_fve_nrm_empty_text"] = summarize(empty, target, scale, var, mean)["fve_nrm"]
    out["ar/val_fve_nrm_random_text"] = summarize(ar.predict(others, tokenizer, batch_size), target, scale, var, mean)[
        "fve_nrm"
    ]
    out["ar/val_fve_nrm_word_salad"] = summarize(ar.predict(salad, tokenizer, batch_size), target, scale, var, mean)[
        "fve_nrm"
    ]
    return out


class ARTrainer:
    """The SFT loop on ready objects: AR, its prepared model and optimizer, rows, accelerator, tracker;
    its own config section and the run's seed."""

    def __init__(
        self,
        cfg: ARConfig,
        seed: int,
        ar: ARModel,
        model,
        tokenizer,
        train: ARRows,
        val: ARRows,
        accelerator,
        tracker: Tracker,
        root: Path,
        meta_fn,
        optimizer,
        scheduler,
        start: dict[str, Any],
        fingerprint: dict[str, Any] | None = None,
    ):
        self.cfg, self.seed, self.ar, self.model, self.tok, self.train, self.val = (
            cfg,
            seed,
            ar,
            model,
            tokenizer,
            train,
            val,
        )
        self.fingerprint = fingerprint or {}  # stored in every checkpoint; a resume must match it
        self.acc, self.tracker, self.root, self.meta_fn = accelerator, tracker, root, meta_fn
        self.scale = cfg.mse_scale or math.sqrt(ar.d_model)
        self.var = target_variance(train.targets, self.scale)
        self.mean = target_mean(train.targets, self.scale)
        params = ar.trainable_parameters()
        self.stepper = OptimizerStep("ar", optimizer, scheduler, lambda: accelerator.clip_grad_norm_(params, 1.0))
        self.step, self.cursor = start.get("step", 0), start.get("cursor", 0)
        restore_skips(start.get("skipped"), self.stepper)
        self.global_batch = cfg.ar_batch_size * accelerator.num_processes
        self.rows_seen, self.train_time = 0, 0.0
        self.last_ckpt: Path | None = start.get("path")

    @property
    def skipped(self) -> int:
        return self.stepper.skipped

    def micro_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This process's share of the next global micro-batch -> (ids, mask, raw targets) on device."""
        rows = row_stream(len(self.train.ids), self.seed, self.cursor, self.global_batch)
        self.cursor += self.global_batch
        mine = rank_share(rows, self.acc)
        ids, mask = pad_batch([self.train.ids[i] for i in mine], self.tok.pad_token_id)
        dev = self.acc.device
        return ids.to(dev), mask.to(dev), self.train.targets[mine].to(dev)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ar_grad_accum micro-batches (`loop.OptimizerStep`'s policy)."""
        start, accum = time.time(), self.cfg.ar_grad_accum
        totals = torch.zeros(3, device=self.acc.device)  # loss sum, cos sum, rows
        for i in range(accum):
            ids, mask, target = self.micro_batch()
            sync = contextlib.nullcontext() if i == accum - 1 else self.acc.no_sync(self.model)
            with sync:
                pred = self.model(ids, mask)
                loss_rows = mse_nrm(pred, target, self.scale)  # [b]
                self.acc.backward(loss_rows.mean() / accum)
            totals += torch.stack(
                [
                    loss_rows.detach().sum(),
                    cosine(pred.detach(), target).sum(),
                    torch.tensor(float(len(target)), device=totals.device),
                ]
            )
        grad_norm, _ = self.stepper()
        self.step += 1
        loss_sum, cos_sum, rows = self.acc.reduce(totals, reduction="sum").tolist()
        loss, cos = loss_sum / max(rows, 1), cos_sum / max(rows, 1)
        self.rows_seen += rows
        self.train_time += time.time() - start
        return {
            "ar/loss": loss,
            "ar/fve_nrm": fve_from_mse(loss, self.var),
            "ar/cos": cos,
            "ar/lr": self.stepper.lr,
            "ar/grad_norm": grad_norm,
            "ar/skipped_steps": self.skipped,
            "ar/rows_per_s": self.rows_seen / max(self.train_time, 1e-9),
        }

    def validate(self) -> dict[str, float]:
        """Main process only (val is small; avoids gathering uneven shards); the others wait."""
        out: dict[str, float] = {}
        if self.acc.is_main_process and len(self.val.texts):
            out = evaluate(
                self.ar, self.tok, self.val, self.scale, self.var, self.mean, self.cfg.ar_batch_size, self.seed
            )
        self.acc.wait_for_everyone()
        return out

    def save(self) -> None:
        self.last_ckpt = self.root / f"checkpoint-{self.step:06d}"  # on every process: all know a save happened
        if self.acc.is_main_process:
            meta = self.meta_fn(self.scale, self.var, self.step)
            save_checkpoint(
                self.root,
                self.step,
                lambda d: save_ar(self.ar, d / "ar", meta, self.tok),
                {"cursor": self.cursor, "skipped": skip_counts(self.stepper), "fingerprint": self.fingerprint},
                self.stepper.saved(),
            )
        self.acc.wait_for_everyone()

    def fit(self, log_every: int = 1, show_progress: bool = True) -> dict[str, Any]:
        """Steps to ar_steps: logs every `log_every`, validates every ar_eval_every, saves every
        ar_save_every and at the end -> the final validation metrics."""
        cfg = self.cfg
        self.model.train()
        bar = progress(
            total=cfg.ar_steps, initial=self.step, enabled=show_progress and self.acc.is_main_process, desc="train-ar"
        )
        while self.step < cfg.ar_steps:
            metrics = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['ar/loss']:.3f}", fve=f"{metrics['ar/fve_nrm']:.3f}")
            if self.step % log_every == 0 or self.step == cfg.ar_steps:
                self.tracker.log(metrics, self.step)
            if self.step % cfg.ar_eval_every == 0 and self.step < cfg.ar_steps:
                self.tracker.log(self.validate(), self.step)
                self.model.train()
            if self.step % cfg.ar_save_every == 0 or self.step == cfg.ar_steps:
                self.save()
        bar.close()
        if self.last_ckpt is None:  # nothing trained in this call (0 steps, or resumed at the end)
            self.save()
        final = self.validate()
        self.tracker.log(final, self.step)
        return final


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
    """Where this AR's checkpoints go: <output_dir>/ar, or the control's or the oracle's folder."""
    return cfg.output_dir / (
        CONTROL_DIR if cfg.ar.ar_shuffle_targets else ORACLE_DIR if cfg.ar.ar_text == "context" else "ar"
    )


def run(cfg: NLAConfig, accelerator=None) -> dict[str, Any]:
    """Train the AR (or, with ar_shuffle_targets, the shuffled-target control); return key numbers."""
    seed_everything(cfg.run.seed)  # run() called directly (demo, tests) is as reproducible as the CLI
    acc = accelerator or make_accelerator(cfg.run.device)
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
        start = {**load_checkpoint_state(resume, {"ar_optimizer": opt, "ar_scheduler": sched}), "path": resume}
    model, opt = acc.prepare(ar, opt)
    tracker = Tracker(
        cfg,
        "train-ar-shuffled-targets" if control else "train-ar-oracle" if oracle else "train-ar",
        is_main=acc.is_main_process,
    )
    tracker.forget_after(int(start.get("step", 0)))  # steps after the checkpoint are trained (and logged) again

    def meta_fn(scale: float, var: float, step: int):
        return model_meta(
            ar,
            train_split.meta,
            cfg.model.model,
            scale,
            {
                "ar_target_variance": var,
                "control": "shuffled_targets" if control else None,
                "ar_text": cfg.ar.ar_text,
                "training": {
                    "stage": "train-ar",
                    "step": step,
                    "ar_steps": cfg.ar.ar_steps,
                    "ar_lr": cfg.ar.ar_lr,
                    "ar_batch_size": cfg.ar.ar_batch_size,
                    "ar_grad_accum": cfg.ar.ar_grad_accum,
                    "num_processes": acc.num_processes,
                    "dtype": cfg.model.dtype,
                    "seed": cfg.run.seed,
                    "train_rows": len(train.ids),
                    "dataset": str(train_split.path),
                    "dataset_id": train_split.meta.extra.get("dataset_id"),
                },
            },
        )

    trainer = ARTrainer(
        cfg.ar,
        cfg.run.seed,
        ar,
        model,
        tokenizer,
        train,
        val,
        acc,
        tracker,
        root,
        meta_fn,
        opt,
        sched,
        start,
        fingerprint,
    )
    began = time.time()
    final = trainer.fit(cfg.logging.log_every, cfg.logging.progress)
    checkpoint = publish_final(trainer.last_ckpt, root) if acc.is_main_process else root / "final"
    acc.wait_for_everyone()
    summary = _summary(final, trainer, control, checkpoint, time.time() - began)
    tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    tracker.finish()
    return summary


def _summary(
    final: dict[str, float], trainer: ARTrainer, control: bool, checkpoint: Path, wall_s: float
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
        "steps": trainer.step,
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
