"""Test helper (not a test): run stages like `nla.cli` does, then dump each rank's trainable weights.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py DUMP STAGE ARGS [:: STAGE ARGS ...]

Each `::`-separated run k executes `<stage>.run(cfg, accelerator)` on every process (one process
group, one Accelerator for all runs: the start-up is paid once), then writes
`DUMP/<k>/rank<i>.safetensors` with that rank's LoRA weights (+ the AR head), so a test can check
that data-parallel ranks really hold the same model. The weights are captured by wrapping the
trainer's `__init__`; the stage code itself is untouched.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from nla.stages import rl, train_ar, train_av
from nla.stages.stage import start_stage
from nla.train import ar_sft, av_sft, grpo
from nla.train.distributed import make_accelerator

STAGES = {"train-av": train_av, "train-ar": train_ar, "rl": rl}
captured: dict[str, torch.nn.Module] = {}


def _capture(cls, grab):
    init = cls.__init__

    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        captured.clear()
        captured.update(grab(self))

    cls.__init__ = wrapped


_capture(av_sft.AVTrainer, lambda t: {"": t.unwrapped})
_capture(ar_sft.ARTrainer, lambda t: {"": t.ar})
_capture(grpo.JointTrainer, lambda t: {"": t.model, "ar_head.": t.ar.head})


def weights() -> dict[str, torch.Tensor]:
    """LoRA tensors of every adapter (av, av_ref, ar, default) and the AR head, by name."""
    out = {}
    for prefix, module in captured.items():
        for name, p in module.named_parameters():
            if prefix or "lora_" in name or name.startswith("head."):
                out[prefix + name] = p.detach().float().cpu().contiguous()
    return out


def main(argv: list[str]) -> int:
    dump, rest = Path(argv[0]), argv[1:]
    runs, current = [], []
    for a in rest + ["::"]:
        if a == "::":
            runs.append(current)
            current = []
        else:
            current.append(a)
    acc = None
    try:
        for k, (stage, *args) in enumerate(runs):
            cfg, _ = start_stage(args, stage)
            acc = acc or make_accelerator(cfg.run.device)
            STAGES[stage].run(cfg, acc)
            (dump / str(k)).mkdir(parents=True, exist_ok=True)
            save_file(weights(), str(dump / str(k) / f"rank{acc.process_index}.safetensors"))
            print(f"[dist_worker] run {k} ({stage}) done on rank {acc.process_index}/{acc.num_processes}", flush=True)
    finally:
        if acc is not None:
            acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
