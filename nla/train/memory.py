"""Peak tensor memory of a piece of work, measured on any device (the CPU has no allocator stats).

`TensorPeak` watches every tensor the dispatcher creates inside its `with` block and keeps the
bytes of the storages still alive: `peak` is the most held at once, on top of what existed
before (parameters, buffers, optimizer states already made). Views share their base's storage and
count once, and so does a view of a tensor made before (a parameter's transpose); what autograd saves for backward stays alive until backward frees it, so a training
step's peak is its activations plus whatever it allocates for good (a first AdamW step's moments).
Kernel-internal scratch space is not seen. `nla plan`'s estimate is checked against it (tests).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorPeak(TorchDispatchMode):
    """with TensorPeak() as m: work() -> m.peak (bytes), m.current (still held at the end)."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):  # a view or an in-place result shares an input's storage: not new memory
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in inputs:
                    self._track(storage)
        return out

    def _track(self, storage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._live:
            return
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)
