"""`nla train-av`: supervised warm start of the AV (activation -> explanation).

    nla train-av --config configs/embedded.yaml [--av_steps 200 --av_lr 2e-4 --resume never]
    accelerate launch --multi_gpu --num_processes 8 -m nla.cli train-av --config configs/x.yaml

Reads `<data_dir>/av_sft.parquet` and `<data_dir>/val.parquet` (from `nla datagen`), puts LoRA
(or, with av_lora_r 0, full fine-tuning) on the target model, and trains next-token loss on the
response only, with each row's activation injected at the marker. Checkpoints go to
`<output_dir>/av/checkpoint-*/av/` (adapter or weights + tokenizer + `nla_meta.yaml`), the last
one to `<output_dir>/av/final/`. `--resume auto` continues from the newest checkpoint with the
same data order (the order is a pure function of seed and step).

The control, in every eval: the same val rows with their vectors permuted across rows. An AV that
reads the vector has a clearly lower loss on the real pairing (`av/shuffle_gap` > 0); one that
only learned the style of the explanations does equally well on both.

Why a plain Accelerate loop and not trl's SFTTrainer: every row carries an activation vector that
must reach the embedding hook in the same forward as its tokens. SFTTrainer's collator and
dataloader drop unknown columns and reorder/pack rows, so the vectors would need a custom
collator, a `compute_loss` override and a hook fed from inside it, which is most of a trainer
anyway. The loop below is ~100 lines, shares `response_logprobs` with the RL stage, and makes the
data order a function of (seed, step), which is what exact resume needs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nla.core import claims, metrics, seeds
from nla.core.config import AVConfig, ConfigError, NLAConfig
from nla.core.sidecar import Meta, dataset_meta_path, read_meta
from nla.core.tracking import Tracker, progress
from nla.data.splits import Split, derangement, load_split, split_path
from nla.models.av import (
    IGNORE,
    Verbalizer,
    build_sft_batch,
    check_prompts,
    load_av_model,
    make_av_meta,
    prompt_ids,
    read_av_meta,
    response_logprobs,
    save_av,
)
from nla.models.injection import InjectionHook
from nla.models.lora import apply_lora, trainable_parameters
from nla.models.sources import ModelSource
from nla.stages.stage import seed_everything, start_stage
from nla.train.checkpoint import load_checkpoint_state, publish_final, save_checkpoint, start_from, training_fingerprint
from nla.train.distributed import make_accelerator, rank_share
from nla.train.loop import OptimizerStep, restore_skips, row_stream, schedule, skip_counts

SAMPLE_ROWS = 8  # val rows generated (greedy) at each eval for the samples table and CJK check
CONTEXT_TAIL_CHARS = 160
MAX_GRAD_NORM = 1.0


@dataclass
class AVData:
    train: Split
    val: Split
    prompt: list[int]  # the canonical AV prompt ids
    injection_scale: float


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


class AVTrainer:
    """The SFT loop on ready objects (model, data, optimizer, tracker), its own config section and the
    run's seed: `fit(start_step)`, `evaluate()`. Checkpoints go to `root`; `save_config(folder)` adds
    the run's config to each."""

    def __init__(
        self,
        cfg: AVConfig,
        seed: int,
        accelerator,
        model,
        tokenizer,
        meta: Meta,
        data: AVData,
        optimizer,
        scheduler,
        tracker: Tracker,
        root: Path,
        save_config: Callable[[Path], None],
        start: dict[str, Any] | None = None,
        fingerprint: dict[str, Any] | None = None,
    ):
        self.cfg, self.seed, self.acc = cfg, seed, accelerator
        self.model, self.tok, self.meta, self.data = model, tokenizer, meta, data
        self.fingerprint = fingerprint or {}  # stored in every checkpoint; a resume must match it
        self.tracker, self.root, self.save_config = tracker, root, save_config
        self.unwrapped = accelerator.unwrap_model(model)
        params = trainable_parameters(self.unwrapped)
        self.stepper = OptimizerStep(
            "av", optimizer, scheduler, lambda: accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
        )
        restore_skips((start or {}).get("skipped"), self.stepper)
        self.hook = InjectionHook(self.unwrapped, *meta.tokens.ids, data.injection_scale)
        other = derangement(len(data.val), seed + seeds.SHUFFLED_VECTORS) if len(data.val) > 1 else slice(None)
        self.shuffled = data.val.vectors[other]
        self.last_eval: dict[str, Any] = {}
        self.start_eval: dict[str, Any] = {}  # step 0 (fresh runs only)
        self.last_checkpoint: Path | None = None
        self.tokens_per_s, self.train_s = 0.0, 0.0  # this run's training steps only

    # -- one micro-batch
    def _batch(self, rows: list[int], split: Split) -> dict[str, torch.Tensor]:
        batch = build_sft_batch(self.tok, self.data.prompt, [split.column("response")[i] for i in rows])
        return {k: v.to(self.acc.device) for k, v in batch.items()}

    def _nll(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor) -> torch.Tensor:
        """Summed NLL over the response tokens of `batch`, `vectors` [b, d] injected."""
        mask = batch["labels"] != IGNORE
        return -response_logprobs(
            self.model, batch["input_ids"], batch["attention_mask"], mask, vectors, self.hook
        ).sum()

    def rows_per_step(self) -> int:
        return self.cfg.av_batch_size * self.cfg.av_grad_accum * self.acc.num_processes

    def _step_rows(self, step: int) -> list[list[int]]:
        """This process's micro-batches for optimizer step `step` (shard of the global window)."""
        b, a, p = self.cfg.av_batch_size, self.cfg.av_grad_accum, self.acc.num_processes
        window = row_stream(len(self.data.train), self.seed, step * self.rows_per_step(), self.rows_per_step())
        return [window[(i * p + self.acc.process_index) * b :][:b] for i in range(a)]

    def train_step(self, step: int) -> dict[str, float]:
        micro = self._step_rows(step)
        batches = [self._batch(rows, self.data.train) for rows in micro]
        # Normalise by the response tokens of the whole global step (every micro-batch on every
        # process), so accumulation and N processes x B both equal one big batch. DDP averages the
        # gradients over processes, hence the factor num_processes.
        total = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
        global_total = float(self.acc.reduce(torch.tensor(float(total), device=self.acc.device), "sum"))
        norm = max(global_total, 1.0) / self.acc.num_processes
        loss_sum = 0.0
        for i, (rows, batch) in enumerate(zip(micro, batches)):
            # no_sync: DDP all-reduces gradients only on the last micro-batch of the step.
            ctx = self.acc.no_sync(self.model) if i < len(micro) - 1 else contextlib.nullcontext()
            with ctx:
                nll = self._nll(batch, self.data.train.vectors[rows])
                self.acc.backward(nll / norm)
            loss_sum += float(nll.detach())
        grad_norm, skipped = self.stepper()
        seen = sum(int(b["attention_mask"].sum()) for b in batches)
        stats = self.acc.reduce(
            torch.tensor([loss_sum, total, seen], device=self.acc.device, dtype=torch.float64), "sum"
        )
        return {
            "av/loss": float(stats[0] / stats[1]),
            "tokens": float(stats[2]),
            "av/grad_norm": grad_norm,
            "av/skipped_step": float(skipped),
        }

    @torch.no_grad()
    def val_loss(self, vectors: torch.Tensor) -> float:
        """Token-mean NLL of the val responses given `vectors` [n_val, d] (this process's shard, reduced)."""
        n, b = len(self.data.val), self.cfg.av_batch_size
        mine = rank_share(list(range(n)), self.acc)
        nll, count = 0.0, 0
        for start in range(0, len(mine), b):
            rows = mine[start : start + b]
            batch = self._batch(rows, self.data.val)
            nll += float(self._nll(batch, vectors[rows]))
            count += int((batch["labels"] != IGNORE).sum())
        stats = self.acc.reduce(torch.tensor([nll, count], device=self.acc.device, dtype=torch.float64), "sum")
        return float(stats[0] / max(stats[1], 1))

    @torch.no_grad()
    def sample_table(self) -> tuple[list[list[str]], float, float]:
        """Greedy explanations for the first val rows: (rows [context_tail, teacher, av], non-Latin rate, fail rate)."""
        val, n = self.data.val, min(SAMPLE_ROWS, len(self.data.val))
        verbalizer = Verbalizer(
            self.unwrapped, self.tok, self.meta, self.data.injection_scale, self.cfg.av_max_new_tokens
        )
        samples = [s[0] for s in verbalizer.verbalize(val.vectors[:n], temperature=0.0)]
        contexts = val.columns.get("detokenized_text_truncated") or [""] * n
        rows = [
            ["…" + str(contexts[i])[-CONTEXT_TAIL_CHARS:], str(val.column("explanation")[i]), s.explanation or s.text]
            for i, s in enumerate(samples)
        ]
        fail = sum(s.failed for s in samples) / max(n, 1)
        return rows, metrics.non_latin_rate(s.text for s in samples), fail

    def evaluate(self, step: int) -> dict[str, Any]:
        self.model.eval()
        real, shuffled = self.val_loss(self.data.val.vectors), self.val_loss(self.shuffled)
        out: dict[str, Any] = {"av/val_loss": real, "av/val_loss_shuffled": shuffled, "av/shuffle_gap": shuffled - real}
        if self.acc.is_main_process:
            rows, non_latin, fail = self.sample_table()
            out.update({"av/non_latin_rate": non_latin, "av/extraction_fail_rate": fail})
            self.tracker.log_table("av/samples", ["context_tail", "teacher", "av"], rows, step)
            out["samples"] = rows
        self.tracker.log({k: v for k, v in out.items() if k != "samples"}, step)
        self.model.train()
        self.last_eval = out
        return out

    def save(self, step: int) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.meta.extra["training"]["step"] = step

            def write(tmp: Path) -> None:
                save_av(self.unwrapped, self.tok, self.meta, tmp / "av")
                self.save_config(tmp)

            state = {
                "cursor": step * self.rows_per_step(),
                "skipped": skip_counts(self.stepper),
                "fingerprint": self.fingerprint,
            }
            self.last_checkpoint = save_checkpoint(self.root, step, write, state, self.stepper.saved())
        self.acc.wait_for_everyone()

    def fit(self, start_step: int, log_every: int = 1, show_progress: bool = True) -> None:
        """Steps from `start_step` to av_steps: logs every `log_every`, evaluates every av_eval_every,
        saves every av_save_every and at the end."""
        cfg, steps = self.cfg, self.cfg.av_steps
        if start_step == 0 and cfg.av_eval_at_start:
            self.start_eval = self.evaluate(0)  # the starting point: real vs shuffled before any training
        self.model.train()
        # Throughput counts training steps only (not evals or saves): (tokens, seconds).
        window_loss, window, total = [], [0.0, 0.0], [0.0, 0.0]
        bar = progress(
            range(start_step, steps),
            enabled=show_progress and self.acc.is_main_process,
            desc="train-av",
            initial=start_step,
            total=steps,
        )
        for step in bar:
            t0 = time.time()
            stats = self.train_step(step)
            for acc in (window, total):
                acc[0], acc[1] = acc[0] + stats["tokens"], acc[1] + time.time() - t0
            window_loss.append(stats["av/loss"])
            done = step + 1
            if done % log_every == 0 or done == steps:
                self.tracker.log(
                    {
                        "av/loss": sum(window_loss) / len(window_loss),
                        "av/lr": self.stepper.lr,
                        "av/tokens_per_s": window[0] / max(window[1], 1e-9),
                        "av/grad_norm": stats["av/grad_norm"],
                        "av/skipped_step": stats["av/skipped_step"],
                    },
                    done,
                )
                bar.set_postfix(loss=f"{window_loss[-1]:.3f}")
                window_loss, window = [], [0.0, 0.0]
            self.tokens_per_s, self.train_s = total[0] / max(total[1], 1e-9), total[1]
            if done % cfg.av_eval_every == 0 or done == steps:
                self.evaluate(done)
            if done % cfg.av_save_every == 0 or done == steps:
                self.save(done)
        if steps == 0 and start_step == 0:
            self.save(0)  # av_steps 0: publish the untrained AV (a baseline for later stages)


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
    trainer = AVTrainer(
        cfg.av,
        cfg.run.seed,
        acc,
        model,
        tokenizer,
        meta,
        data,
        optimizer,
        scheduler,
        tracker,
        cfg.output_dir / "av",
        cfg.save,
        state,
        fingerprint,
    )
    if start_step < cfg.av.av_steps:
        trainer.fit(start_step, cfg.logging.log_every, cfg.logging.progress)
    else:  # resumed a finished run: nothing to train, report and republish
        trainer.last_checkpoint = resume_from
        trainer.evaluate(start_step)
    final = publish_final(trainer.last_checkpoint, cfg.output_dir / "av") if acc.is_main_process else None
    ev = trainer.last_eval
    summary = {
        "val_loss": ev["av/val_loss"],
        "val_loss_shuffled": ev["av/val_loss_shuffled"],
        "shuffle_gap": ev["av/shuffle_gap"],
        "val_loss_start": trainer.start_eval.get("av/val_loss"),
        "shuffle_gap_start": trainer.start_eval.get("av/shuffle_gap"),
        "non_latin_rate": ev.get("av/non_latin_rate"),
        "extraction_fail_rate": ev.get("av/extraction_fail_rate"),
        "samples": [tuple(r) for r in ev.get("samples", [])[:3]],
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
