"""Accelerate set-up shared by every stage.

On a machine without CUDA, Accelerate only joins the process group when built with `cpu=True`
(otherwise each of N launched processes silently trains alone as rank 0 of 1). One torch thread
per process when several share a CPU avoids oversubscription.
"""

from __future__ import annotations

import os

import torch

from nla.models.sources import pick_device


def make_accelerator(device: str = "auto"):
    from accelerate import Accelerator

    cpu = pick_device(device).type == "cpu"
    if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    return Accelerator(cpu=cpu)


def local_processes(accelerator) -> int:
    """How many processes of the run share this machine (the launcher's LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))


def rank_share(rows, accelerator):
    """This process's share of `rows` (a list or tensor): every num_processes-th row, from its rank."""
    return rows[accelerator.process_index :: accelerator.num_processes]


def mean_over_processes(values: dict[str, float], accelerator) -> dict[str, float]:
    """One gather for all metrics; NaN entries (nothing usable on a process) are left out of the mean."""
    keys = sorted(values)
    if accelerator is None:
        return {k: float(values[k]) for k in keys}
    local = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    every = accelerator.gather(local.unsqueeze(0)).reshape(-1, len(keys)).cpu()  # [processes, k]
    return {k: float(v) for k, v in zip(keys, every.nanmean(dim=0))}
