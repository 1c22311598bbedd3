"""The AR's warm start: rows ready for the AR, its held-out metrics with their text controls, and
`ARTrainer` (explanation text -> the activation of block K, MSE_nrm), driven by `trainer.Trainer.fit`.
`nla/stages/train_ar.py` loads the models and data, wires a checkpoint saver and writes the summary."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from nla.core.config import ARConfig
from nla.core.metrics import cosine, fve_from_mse, mse_nrm, summarize, target_mean, target_variance
from nla.core.sidecar import SidecarError
from nla.core.templates import ar_prompt, context_tail
from nla.data.splits import Split, derangement
from nla.models.ar import ARModel, pad_batch
from nla.train.distributed import rank_share
from nla.train.loop import OptimizerStep, restore_skips, row_stream, skip_counts
from nla.train.trainer import MAX_GRAD_NORM, Trainer


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


def val_metrics(
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


class ARTrainer(Trainer):
    """The AR's SFT on ready objects: the AR, its prepared model and optimizer, rows, accelerator; its
    own config section and the run's seed; `start` is a resumed checkpoint's state ({} when fresh)."""

    name = "train-ar"

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
        optimizer,
        scheduler,
        start: dict[str, Any],
    ):
        self.cfg, self.seed, self.ar, self.model, self.tok = cfg, seed, ar, model, tokenizer
        self.train, self.val, self.acc = train, val, accelerator
        self.scale = cfg.mse_scale or math.sqrt(ar.d_model)
        self.var = target_variance(train.targets, self.scale)
        self.mean = target_mean(train.targets, self.scale)
        params = ar.trainable_parameters()
        self.stepper = OptimizerStep(
            "ar", optimizer, scheduler, lambda: accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
        )
        self.cursor = start.get("cursor", 0)
        restore_skips(start.get("skipped"), self.stepper)
        self.global_batch = cfg.ar_batch_size * accelerator.num_processes
        self.rows_seen, self.train_time = 0, 0.0

    @property
    def skipped(self) -> int:
        return self.stepper.skipped

    def saved_optimizers(self) -> dict[str, Any]:
        return self.stepper.saved()

    def loop_state(self, done: int) -> dict[str, Any]:
        return {"cursor": self.cursor, "skipped": skip_counts(self.stepper)}

    def micro_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This process's share of the next global micro-batch -> (ids, mask, raw targets) on device."""
        rows = row_stream(len(self.train.ids), self.seed, self.cursor, self.global_batch)
        self.cursor += self.global_batch
        mine = rank_share(rows, self.acc)
        ids, mask = pad_batch([self.train.ids[i] for i in mine], self.tok.pad_token_id)
        dev = self.acc.device
        return ids.to(dev), mask.to(dev), self.train.targets[mine].to(dev)

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over ar_grad_accum micro-batches (`loop.OptimizerStep`'s policy)."""
        self.model.train()
        start, accum = time.time(), self.cfg.ar_grad_accum
        totals = torch.zeros(3, device=self.acc.device)  # loss sum, cos sum, rows
        for i in range(accum):
            ids, mask, target = self.micro_batch()
            sync = contextlib.nullcontext() if i == accum - 1 else self.acc.no_sync(self.model)
            with sync:
                pred = self.model(ids, mask)
                loss_rows = mse_nrm(pred, target, self.scale)  # [b]
                self.acc.backward(loss_rows.mean() / accum)
            rows = torch.tensor(float(len(target)), device=totals.device)
            totals += torch.stack([loss_rows.detach().sum(), cosine(pred.detach(), target).sum(), rows])
        grad_norm, _ = self.stepper()
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

    def postfix(self, metrics: dict[str, float]) -> str:
        return f"loss={metrics['ar/loss']:.3f}, fve={metrics['ar/fve_nrm']:.3f}"

    def validate(self, step: int) -> dict[str, float]:
        """`ar/val_*` on the main process only (val is small; avoids gathering uneven shards); the
        others wait and return nothing."""
        out: dict[str, float] = {}
        if self.acc.is_main_process and len(self.val.texts):
            out = val_metrics(
                self.ar, self.tok, self.val, self.scale, self.var, self.mean, self.cfg.ar_batch_size, self.seed
            )
        self.acc.wait_for_everyone()
        return out
