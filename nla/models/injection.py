"""Put an activation vector into the AV's prompt, in place of the marker token's embedding.

The AV prompt holds one marker token (a single-token character never seen in the corpus). Its
input embedding is replaced by the activation `v`, rescaled to norm `injection_scale`:

    v * scale / max(||v||, 1e-12)        (fp32, then cast to the embedding dtype)

Only a marker immediately preceded by `left_id` and followed by `right_id` (the neighbours taken
from the canonical prompt) is replaced, so a stray marker elsewhere in the text is left alone.
The j-th match in row-major order gets the j-th vector.

`InjectionHook` does this with a forward hook on `model.get_input_embeddings()`. That module
sees the real `input_ids` on every path (training forward, log-prob pass, `generate`'s prompt
pass, PEFT-wrapped models), and its output already includes any embedding scale (Gemma's
x sqrt(d)), so the vector we write there is final: no extra scaling. Code that builds
`inputs_embeds` by hand must call the embedding module first and then `inject`.

Count rule in the hook: zero matches in a call is a no-op (generate's decode steps feed only the
new token, so the marker is gone); any other count that differs from the number of vectors
raises. The pure `inject` is strict: the count must always match.

`generate(num_return_sequences=k)` (and beam search) expands the batch with repeat_interleave
before the prompt pass, so vectors must be given per row of the expanded batch: use
`repeat_for_samples(vectors, k)`.
"""

from __future__ import annotations

import torch
from torch import nn

NORM_EPS = 1e-12


def rescale(vectors: torch.Tensor, scale: float) -> torch.Tensor:
    """[n, d] -> [n, d] fp32, each row with norm `scale` (a zero row stays zero).

    fp32 because a bf16 norm of a d=4096 vector is off by ~1%, which would shift every
    injected vector's norm by a different amount per row.
    """
    if vectors.dim() != 2:
        raise ValueError(f"vectors must be [n, d], got shape {tuple(vectors.shape)}")
    v = vectors.float()
    # clamp_min, not `+ eps`: a zero vector maps to zero instead of NaN (0/0).
    return v * (scale / v.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS))


def repeat_for_samples(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """[n, d] -> [n*k, d], row i repeated k times in a row, matching how `generate` expands
    input_ids for num_return_sequences=k (repeat_interleave, not tile: tiling would give
    sample j of prompt i the vector of another prompt)."""
    return vectors.repeat_interleave(k, dim=0)


def find_marker_positions(input_ids: torch.Tensor, marker_id: int, left_id: int, right_id: int) -> torch.Tensor:
    """[b, t] -> LongTensor [m, 2] of (row, col), row-major, where input_ids[row, col] == marker_id,
    input_ids[row, col-1] == left_id and input_ids[row, col+1] == right_id.

    Markers in the first or last column have a missing neighbour and never match.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [b, t], got shape {tuple(input_ids.shape)}")
    hit = torch.zeros_like(input_ids, dtype=torch.bool)
    if input_ids.shape[1] >= 3:
        hit[:, 1:-1] = (
            (input_ids[:, 1:-1] == marker_id) & (input_ids[:, :-2] == left_id) & (input_ids[:, 2:] == right_id)
        )
    # nonzero() is row-major, which is what pairs match j with vector j.
    return hit.nonzero()


def _replace(embeds: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor, scale: float) -> torch.Tensor:
    if vectors.dim() != 2 or vectors.shape[1] != embeds.shape[-1]:
        raise ValueError(
            f"vectors must be [n, {embeds.shape[-1]}] to match the embedding width, got {tuple(vectors.shape)}"
        )
    new = rescale(vectors.to(embeds.device), scale).to(embeds.dtype)
    # Out-of-place (clone, then index_put): a caller's `embeds` (e.g. a cached prompt embedding)
    # would otherwise silently keep the previous vector, and autograd never sees an in-place edit
    # of a tensor some other op saved for backward. Gradient still flows to the vectors and LoRA.
    out = embeds.clone()
    out[positions[:, 0], positions[:, 1]] = new
    return out


def _mismatch(positions: torch.Tensor, expected: int, batch: int) -> ValueError:
    per_row = torch.bincount(positions[:, 0].cpu(), minlength=batch).tolist()
    shown = per_row if batch <= 16 else per_row[:16] + ["..."]
    return ValueError(
        f"activation injection: found {positions.shape[0]} marker position(s) (marker with its left/right "
        f"neighbours), expected {expected} (one per vector); matches per row: {shown}. Each prompt must "
        "contain the marker exactly once with the canonical neighbours; for num_return_sequences=k pass "
        "repeat_for_samples(vectors, k)."
    )


def inject(
    embeds: torch.Tensor,
    input_ids: torch.Tensor,
    vectors: torch.Tensor,
    marker_id: int,
    left_id: int,
    right_id: int,
    scale: float,
) -> torch.Tensor:
    """embeds [b, t, d], input_ids [b, t], vectors [n, d] -> new embeds [b, t, d] (input untouched).

    Strict: the number of marker matches must equal n, else ValueError.
    """
    if embeds.shape[:2] != input_ids.shape:
        raise ValueError(f"embeds {tuple(embeds.shape)} and input_ids {tuple(input_ids.shape)} disagree on [b, t]")
    positions = find_marker_positions(input_ids, marker_id, left_id, right_id).to(embeds.device)
    if positions.shape[0] != vectors.shape[0]:
        raise _mismatch(positions, vectors.shape[0], input_ids.shape[0])
    return _replace(embeds, positions, vectors, scale)


class InjectionHook:
    """Forward hook on `model.get_input_embeddings()` that injects `vectors` at the marker.

        with InjectionHook(av, marker_id, left_id, right_id, scale, vectors) as hook:
            out = av(input_ids=ids, attention_mask=mask)      # or av.generate(...)
        assert hook.injected == len(vectors)

    Works for plain HF models and PEFT-wrapped ones (PeftModel.get_input_embeddings resolves to
    the base model's embedding module). Counters: `calls` = hook invocations, `injected` = vectors
    written in total (both reset by `set_vectors`). Zero matches in a call is a no-op (generate's
    decode steps); a non-zero count that differs from len(vectors) raises.
    """

    def __init__(
        self,
        model: nn.Module,
        marker_id: int,
        left_id: int,
        right_id: int,
        scale: float,
        vectors: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.marker_id, self.left_id, self.right_id = int(marker_id), int(left_id), int(right_id)
        self.scale = float(scale)
        self.vectors: torch.Tensor | None = None
        self.calls = 0
        self.injected = 0
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        if vectors is not None:
            self.set_vectors(vectors)

    def set_vectors(self, vectors: torch.Tensor | None) -> InjectionHook:
        """vectors [n, d]: one per marker match, in row-major order. Resets the counters."""
        if vectors is not None and vectors.dim() != 2:
            raise ValueError(f"vectors must be [n, d], got shape {tuple(vectors.shape)}")
        self.vectors = vectors
        self.calls = 0
        self.injected = 0
        return self

    def attach(self) -> InjectionHook:
        if self._handle is None:  # attaching twice would inject twice per call and double-count
            module = self.model.get_input_embeddings()
            self._handle = module.register_forward_hook(self.on_embeddings, with_kwargs=True)
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def __enter__(self) -> InjectionHook:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def on_embeddings(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        """The forward hook itself (public so a benchmark can time its own cost): the embedding
        output with each marker row replaced, or None when the call has no marker."""
        self.calls += 1
        input_ids = args[0] if args else kwargs.get("input_ids", kwargs.get("input"))
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError(
                f"InjectionHook: the embedding module got no [b, t] input_ids (got {type(input_ids).__name__})."
            )
        positions = find_marker_positions(input_ids, self.marker_id, self.left_id, self.right_id)
        if positions.shape[0] == 0:
            # generate's decode steps embed only the new token(s): nothing to replace, not an error.
            return None
        if self.vectors is None:
            # Leaving the raw marker embedding in place would silently train on a constant.
            raise ValueError(f"InjectionHook: found {positions.shape[0]} marker position(s) but no vectors were set.")
        if positions.shape[0] != self.vectors.shape[0]:
            raise _mismatch(positions, self.vectors.shape[0], input_ids.shape[0])
        self.injected += positions.shape[0]
        return _replace(output, positions.to(output.device), self.vectors, self.scale)
