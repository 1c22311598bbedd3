"""The AV's warm start: `AVTrainer` (next-token loss on the teacher's explanation, the row's
activation injected at the marker), driven by `trainer.Trainer.fit`, and its held-out check: the
same val rows read with their own vectors and with other rows' (`av/shuffle_gap` > 0 when the AV
reads the vector). `nla/stages/train_av.py` loads the model and data and writes the summary."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from nla.core import metrics, seeds
from nla.core.config import AVConfig
from nla.core.sidecar import Meta
from nla.core.tracking import Tracker
from nla.data.splits import Split, derangement
from nla.models.av import IGNORE, Verbalizer, build_sft_batch, response_logprobs
from nla.models.injection import InjectionHook
from nla.models.lora import trainable_parameters
from nla.train.distributed import rank_share
from nla.train.loop import OptimizerStep, restore_skips, row_stream, skip_counts
from nla.train.trainer import MAX_GRAD_NORM, Trainer

SAMPLE_ROWS = 8  # val rows generated (greedy) at each check for the samples table and CJK check
CONTEXT_TAIL_CHARS = 160


@dataclass
class AVData:
    train: Split
    val: Split
    prompt: list[int]  # the canonical AV prompt ids
    injection_scale: float


class AVTrainer(Trainer):
    """The AV's SFT on ready objects (model, data, optimizer, accelerator, tracker for its samples
    table), its own config section and the run's seed; `start` is a resumed checkpoint's state."""

    name = "train-av"

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
        start: dict[str, Any] | None = None,
    ):
        self.cfg, self.seed, self.acc = cfg, seed, accelerator
        self.model, self.tok, self.meta, self.data, self.tracker = model, tokenizer, meta, data, tracker
        self.unwrapped = accelerator.unwrap_model(model)
        params = trainable_parameters(self.unwrapped)
        self.stepper = OptimizerStep(
            "av", optimizer, scheduler, lambda: accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
        )
        restore_skips((start or {}).get("skipped"), self.stepper)
        self.hook = InjectionHook(self.unwrapped, *meta.tokens.ids, data.injection_scale)
        other = derangement(len(data.val), seed + seeds.SHUFFLED_VECTORS) if len(data.val) > 1 else slice(None)
        self.shuffled = data.val.vectors[other]
        self.samples: list[list[str]] = []  # the last check's greedy samples (main process)
        self.tokens, self.train_s = 0.0, 0.0  # this run's training steps only (not checks or saves)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.train_s, 1e-9)

    def saved_optimizers(self) -> dict[str, Any]:
        return self.stepper.saved()

    def loop_state(self, done: int) -> dict[str, Any]:
        return {"cursor": done * self.rows_per_step(), "skipped": skip_counts(self.stepper)}

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
        t0 = time.time()
        self.model.train()
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
        seconds = time.time() - t0
        self.tokens, self.train_s = self.tokens + float(stats[2]), self.train_s + seconds
        return {
            "av/loss": float(stats[0] / stats[1]),
            "av/lr": self.stepper.lr,
            "av/grad_norm": grad_norm,
            "av/skipped_step": float(skipped),
            "tokens": float(stats[2]),
            "seconds": seconds,
        }

    def log_view(self, window: list[dict[str, float]]) -> dict[str, float]:
        """The loss averaged over the steps since the last log, their tokens per second."""
        last = window[-1]
        return {
            "av/loss": sum(m["av/loss"] for m in window) / len(window),
            "av/lr": last["av/lr"],
            "av/tokens_per_s": sum(m["tokens"] for m in window) / max(sum(m["seconds"] for m in window), 1e-9),
            "av/grad_norm": last["av/grad_norm"],
            "av/skipped_step": last["av/skipped_step"],
        }

    def postfix(self, metrics: dict[str, float]) -> str:
        return f"loss={metrics['av/loss']:.3f}"

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

    def validate(self, step: int) -> dict[str, float]:
        """Val loss with the rows' own vectors and with other rows' (collective); on the main process
        also greedy samples (kept in `samples`, logged as a table) and their failure rates."""
        self.model.eval()
        real, shuffled = self.val_loss(self.data.val.vectors), self.val_loss(self.shuffled)
        out = {"av/val_loss": real, "av/val_loss_shuffled": shuffled, "av/shuffle_gap": shuffled - real}
        if self.acc.is_main_process:
            self.samples, non_latin, fail = self.sample_table()
            out.update({"av/non_latin_rate": non_latin, "av/extraction_fail_rate": fail})
            self.tracker.log_table("av/samples", ["context_tail", "teacher", "av"], self.samples, step)
        self.model.train()
        return out
