"""The AV (activation verbalizer): batches, log-probs, save/load, and the Verbalizer API.

    from nla.models.av import load_av
    av = load_av("runs/demo/av/final")                 # a checkpoint, its av/ folder, or a released AV dir
    samples = av.verbalize(vectors, num_samples=2)     # vectors [n, d] raw -> list[list[Sample]]
    samples[0][0].explanation                          # text between the tags, None when failed

Prompt layout (the sidecar is the contract): the chat template of ONE user message, the sidecar's
AV template with its marker, plus the generation prompt, tokenized in one call
(`templates.av_prompt_ids`; a second tokenization could add a second BOS and shift every
position). SFT rows append the response tokens and EOS; labels are -100 on the prompt and on
padding. Right padding for training, left padding for generation, attention masks always
(pad == eos on small chat models, so a pad token looks like a real EOS without the mask).

Lower-level pieces for the RL stage: `build_generation_batch`, `Verbalizer.rollout` (sequences +
response mask of sampled explanations) and `response_logprobs` (log-probs of given sequences with
the vector injected; under a PEFT model, switch adapters to get the reference AV's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nla.core import claims, templates
from nla.core.config import TOP_K
from nla.core.sidecar import MODEL_META, Meta, SidecarError, read_meta, write_meta
from nla.models.injection import InjectionHook, repeat_for_samples
from nla.models.sources import ModelSource, load_adapter, pick_device, role_folder

IGNORE = -100  # label value that the loss skips
AV_SUBDIR = "av"  # a training checkpoint holds the AV under <ckpt>/av/
AV_ROLES = ("av", "actor")  # 'actor' is what older reference sidecars say


# ---------------------------------------------------------------- batches


def prompt_ids(tokenizer, meta: Meta) -> list[int]:
    """The canonical AV prompt from the sidecar (marker + template), one tokenization."""
    return templates.av_prompt_ids(tokenizer, meta.tokens.injection_char, meta.av_template)


def check_prompts(prompts: list[Any], meta: Meta, where: str = "dataset") -> None:
    """Every row's `prompt` must be the sidecar's template filled with its marker.

    Rows are tokenized from the sidecar, so a row written with another template would silently
    train on a prompt it was not made with (template drift): refuse it instead.
    """
    expected = templates.av_user_message(meta.tokens.injection_char, meta.av_template)
    for i, p in enumerate(prompts):
        text = p[-1]["content"] if isinstance(p, list) and p and isinstance(p[-1], dict) else p
        if text != expected:
            raise SidecarError(
                f"{where}: row {i}'s prompt differs from the sidecar's AV template filled with "
                f"{meta.tokens.injection_char!r} (template drift); regenerate the data with `nla datagen`."
            )


def pad(rows: list[list[int]], pad_id: int, side: str, fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rows -> (ids [b, t], mask [b, t]); `fill` (default pad_id) is the value written in padding."""
    t = max(map(len, rows))
    value = pad_id if fill is None else fill
    ids, mask = [], []
    for r in rows:
        gap = [value] * (t - len(r))
        ids.append(gap + list(r) if side == "left" else list(r) + gap)
        ones, zeros = [1] * len(r), [0] * (t - len(r))
        mask.append(zeros + ones if side == "left" else ones + zeros)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def build_sft_batch(tokenizer, prompt: list[int], responses: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded SFT batch: prompt + response tokens + EOS.

    Returns input_ids, attention_mask, labels, each [b, t]; labels = input_ids on the response and
    its EOS, IGNORE on the prompt and padding (loss on the response only).
    """
    eos = tokenizer.eos_token_id
    answers = [tokenizer.encode(r, add_special_tokens=False) + [eos] for r in responses]
    ids, mask = pad([prompt + a for a in answers], tokenizer.pad_token_id, "right")
    labels, _ = pad([[IGNORE] * len(prompt) + a for a in answers], tokenizer.pad_token_id, "right", fill=IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_generation_batch(tokenizer, n: int, meta: Meta) -> tuple[torch.Tensor, torch.Tensor]:
    """n copies of the canonical prompt, left-padded: (input_ids [n, t], attention_mask [n, t])."""
    return pad([prompt_ids(tokenizer, meta)] * n, tokenizer.pad_token_id, "left")


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[b, t] positions counted over real tokens only, as `generate` does for left-padded rows."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


# A prompt prefix shorter than this is not worth a second forward call.
MIN_SHARED_PREFIX = 8


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, marker_id: int, limit: int) -> int:
    """[b, t] -> how many leading columns every row has identical and unmasked, ending before the
    marker's left neighbour (the injection hook matches the marker with both neighbours in one
    call) and at most `limit`; 0 when fewer than MIN_SHARED_PREFIX."""
    same = (input_ids == input_ids[:1]).all(0) & (attention_mask == 1).all(0)
    differ = (~same).nonzero()
    p = int(differ[0]) if len(differ) else input_ids.shape[1]
    marker_cols = (input_ids == marker_id).any(0).nonzero()
    if len(marker_cols):
        p = min(p, int(marker_cols[0]) - 1)
    p = min(p, limit)
    return p if p >= MIN_SHARED_PREFIX else 0


def cache_keyword(model: nn.Module) -> str:
    """transformers renamed the forward's `past_key_values` to `cache` (5.24)."""
    import inspect

    inner = model
    while hasattr(inner, "module") or hasattr(inner, "get_base_model"):  # DDP, then PEFT wrappers
        inner = inner.module if hasattr(inner, "module") else inner.get_base_model()
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def shared_prefix(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, marker_id: int, limit: int, rows: int
) -> tuple[int, dict[str, Any]]:
    """(p, forward kwargs): the KV cache of the first p columns (`shared_prefix_length`), computed
    once on row 0 and repeated for `rows` rows, under the keyword the model's forward takes; (0, {})
    when there is nothing to share or the model's cache cannot be repeated. Gradients flow back
    through the repeat into the prefix pass."""
    p = shared_prefix_length(input_ids, attention_mask, marker_id, limit) if rows > 1 else 0
    if not p:
        return 0, {}
    inner = getattr(model, "module", model)  # one DDP forward per backward: the prefix goes unwrapped
    out = inner(
        input_ids=input_ids[:1, :p],
        attention_mask=torch.ones_like(input_ids[:1, :p]),
        position_ids=position_ids(attention_mask)[:1, :p],
        use_cache=True,
        logits_to_keep=1,
    )
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return 0, {}
    cache.batch_repeat_interleave(rows)
    return p, {cache_keyword(model): cache}


def response_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    vectors: torch.Tensor,
    hook: InjectionHook,
    share_prefix: bool = True,
) -> torch.Tensor:
    """log p(input_ids[:, j] | input_ids[:, :j]) with `vectors` [b, d] injected -> [b, t] (0 off the response).

    Only the logits from the first response column on are computed (`logits_to_keep`): the full
    [b, t, vocab] tensor of a long prompt is most of the memory of an SFT or RL step. Every row
    starts with the same prompt, and the part before the marker does not depend on the vector, so
    it runs once and its KV cache is repeated for the batch (`share_prefix`; the same numbers to
    float rounding, ~1.6x faster for an SFT batch of 8 on the embedded model, docs/benchmarks.md).
    """
    b, t = input_ids.shape
    cols = response_mask.any(dim=0).nonzero()
    if len(cols) == 0 or int(cols[0]) == 0:
        raise ValueError("response_mask must mark at least one token after the first column.")
    first = int(cols[0])
    positions = position_ids(attention_mask)
    attached_here = not hook.attached
    hook.set_vectors(vectors)
    if attached_here:
        hook.attach()
    try:
        p, extra = (
            shared_prefix(model, input_ids, attention_mask, hook.marker_id, first - 1, b) if share_prefix else (0, {})
        )
        out = model(
            input_ids=input_ids[:, p:],
            attention_mask=attention_mask,
            position_ids=positions[:, p:],
            logits_to_keep=t - first + 1,
            use_cache=False,
            **extra,
        )
    finally:
        if attached_here:
            hook.remove()
    if hook.injected != vectors.shape[0]:
        raise RuntimeError(
            f"injection wrote {hook.injected} vectors, expected {vectors.shape[0]}: the prompt lost its marker."
        )
    logits = out.logits[:, :-1].float()  # [b, t-first, vocab], predicts tokens first..t-1
    targets = input_ids[:, first:]
    token_lp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    full = torch.zeros(b, t, dtype=token_lp.dtype, device=token_lp.device)
    full[:, first:] = token_lp * response_mask[:, first:].to(token_lp.dtype)
    return full


def generated_mask(new_tokens: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """[b, T] generated tokens -> [b, T] mask of the response: up to and including the first EOS."""
    is_eos = torch.zeros_like(new_tokens, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= new_tokens == e
    before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS seen strictly before this column
    return (before == 0).long()


def assemble_rollout(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    new_tokens: torch.Tensor,
    eos_ids: set[int],
    tokenizer,
    new_logprobs: torch.Tensor | None = None,
) -> Rollout:
    """Prompt [b, t] + sampled tokens [b, w] (padded after EOS) -> the `Rollout` every engine returns:
    the response mask up to and including EOS, texts without EOS, `hit_cap` where no EOS came, and
    the engine's log-probs [b, w] (if given) placed on the response columns."""
    resp = generated_mask(new_tokens, eos_ids)
    hit_cap = ~torch.isin(new_tokens, torch.tensor(sorted(eos_ids), device=new_tokens.device)).any(-1)
    texts = []
    for row, m in zip(new_tokens, resp):
        keep = row[m.bool()].tolist()
        if keep and keep[-1] in eos_ids:
            keep = keep[:-1]
        texts.append(tokenizer.decode(keep, skip_special_tokens=False))
    logprobs = None
    if new_logprobs is not None:
        logprobs = torch.cat(
            [torch.zeros(prompt_ids.shape, dtype=new_logprobs.dtype, device=new_logprobs.device), new_logprobs * resp],
            dim=1,
        )
    return Rollout(
        torch.cat([prompt_ids, new_tokens], dim=1),
        torch.cat([prompt_mask, resp], dim=1),
        torch.cat([torch.zeros_like(prompt_mask), resp], dim=1),
        prompt_ids.shape[1],
        texts,
        hit_cap,
        engine_logprobs=logprobs,
    )


# ---------------------------------------------------------------- the Verbalizer


@dataclass
class Sample:
    text: str  # the raw response (up to EOS)
    explanation: str | None  # between the tags; None when missing
    failed: bool  # no closing tag, the AV's format broken, or hit the length cap
    n_tokens: int  # generated tokens, EOS included


@dataclass
class Rollout:
    """Sampled responses for n vectors x k samples (row i*k + j = sample j of vector i)."""

    sequences: torch.Tensor  # [n*k, t] prompt (left-padded) + response (padded after EOS)
    attention_mask: torch.Tensor  # [n*k, t]
    response_mask: torch.Tensor  # [n*k, t] 1 on generated tokens up to and including EOS
    prompt_len: int
    texts: list[str]
    hit_cap: torch.Tensor  # [n*k] bool: no EOS within max_new_tokens
    engine_logprobs: torch.Tensor | None = None  # [n*k, t] the sampling engine's log-probs (vllm engine only)


class Verbalizer:
    """Generates explanations from activation vectors with a loaded AV."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        meta: Meta,
        injection_scale: float,
        max_new_tokens: int = 64,
        batch_size: int = 32,
    ):
        self.model, self.tokenizer, self.meta = model, tokenizer, meta
        self.injection_scale = float(injection_scale)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.hook = InjectionHook(model, *meta.tokens.ids, self.injection_scale)
        self.format = claims.trained_format(meta.extra)  # what a usable answer looks like (`claims.read_answer`)
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_ids = {tokenizer.eos_token_id} | set(
            gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def rollout(
        self,
        vectors: torch.Tensor,
        num_samples: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        top_k: int = TOP_K,
    ) -> Rollout:
        """One generate call for vectors [n, d] (no chunking); greedy when temperature == 0, else
        sampled from the `top_k` likeliest tokens (0: all)."""
        from transformers import GenerationConfig

        n, k = vectors.shape[0], num_samples
        sampling = temperature > 0
        # Greedy samples are identical and generate refuses num_return_sequences > 1 without
        # sampling: generate once per vector and repeat the rows.
        k_gen = k if sampling else 1
        ids, mask = build_generation_batch(self.tokenizer, n, self.meta)
        ids, mask = ids.to(self.device), mask.to(self.device)
        gen = GenerationConfig(
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=None,
            top_k=top_k if sampling else None,  # None would mean transformers' default, 50
            num_return_sequences=k_gen,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.eos_ids),
        )
        # The prompt before the marker is the same for every row: its KV cache is computed once and
        # repeated for the n * k_gen rows generate will run (it takes a cache as given).
        _, extra = shared_prefix(self.model, ids, mask, self.hook.marker_id, ids.shape[1] - 1, n * k_gen)
        self.hook.set_vectors(repeat_for_samples(vectors, k_gen))
        with self.hook:
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen, **extra)
        if self.hook.injected != n * k_gen:  # loud: an AV without its vector writes fluent nonsense
            raise RuntimeError(f"injection wrote {self.hook.injected} vectors, expected {n * k_gen}.")
        out = out.repeat_interleave(k // k_gen, dim=0)
        t = ids.shape[1]
        return assemble_rollout(out[:, :t], mask.repeat_interleave(k, 0), out[:, t:], self.eos_ids, self.tokenizer)

    def verbalize(
        self,
        vectors: torch.Tensor,
        num_samples: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        batch_size: int | None = None,
    ) -> list[list[Sample]]:
        """vectors [n, d] raw -> n lists of `num_samples` Samples (left-padded, vector injected), at most
        `batch_size` (default: the Verbalizer's) sequences per generate call."""
        if vectors.dim() != 2:
            raise ValueError(f"vectors must be [n, d], got shape {tuple(vectors.shape)}.")
        rows_per_call = max(1, (batch_size or self.batch_size) // num_samples)
        results: list[list[Sample]] = []
        for start in range(0, vectors.shape[0], rows_per_call):
            ro = self.rollout(vectors[start : start + rows_per_call], num_samples, temperature, max_new_tokens)
            n_tokens = ro.response_mask.sum(-1).tolist()
            samples = []
            for text, cap, nt in zip(ro.texts, ro.hit_cap.tolist(), n_tokens):
                explanation, usable = claims.read_answer(self.format, text)
                samples.append(Sample(text, explanation, not usable or cap, int(nt)))
            results += [samples[i : i + num_samples] for i in range(0, len(samples), num_samples)]
        return results


# ---------------------------------------------------------------- save / load


def make_av_meta(
    data_meta: Meta,
    d_model: int,
    base_model: str,
    injection_scale: float,
    lora_r: int,
    provenance: dict[str, Any] | None = None,
) -> Meta:
    """The model sidecar of an SFT AV, carrying the dataset's tokens and templates."""
    return Meta(
        kind="nla_model",
        tokens=data_meta.tokens,
        av_template=data_meta.av_template,
        ar_template=data_meta.ar_template,
        d_model=d_model,
        layer_index=data_meta.layer_index,
        base_model=base_model,
        extra={
            "role": "av",
            "stage": "sl",
            "extraction": {"injection_scale": float(injection_scale), "mse_scale": None},
            "lora": {"r": int(lora_r)},
            "training": provenance or {},
        },
    )


def save_av(model: nn.Module, tokenizer, meta: Meta, out_dir: str | Path) -> Path:
    """PEFT adapter (safetensors) or full weights, plus the tokenizer and `nla_meta.yaml`."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_meta(out_dir / MODEL_META, meta)
    return out_dir


def injection_scale_of(meta: Meta, where: str) -> float:
    scale = (meta.extra.get("extraction") or {}).get("injection_scale")
    if scale is None or float(scale) <= 0:
        raise SidecarError(
            f"{where}: the sidecar has no positive extraction.injection_scale; add it (the norm vectors are injected at)."
        )
    return float(scale)


def read_av_meta(av_dir: Path) -> Meta:
    meta = read_meta(av_dir / MODEL_META)
    role = meta.extra.get("role")
    if meta.kind != "nla_model" or (role is not None and role not in AV_ROLES):
        raise SidecarError(
            f"{av_dir}: the sidecar describes kind={meta.kind}, role={role}; an AV needs kind nla_model, role av."
        )
    return meta


def load_av_model(
    av_dir: Path,
    meta: Meta,
    dtype: str = "float32",
    is_trainable: bool = False,
    source: ModelSource = ModelSource(),
    adapter_name: str = "default",
) -> nn.Module:
    """A PEFT adapter on its base model (the sidecar's base_checkpoint), or a plain HF folder: the one
    way an AV's weights are loaded (nla verbalize/eval, resuming train-av, joint RL)."""
    if (av_dir / "adapter_config.json").is_file():
        if not meta.base_model:
            raise SidecarError(f"{av_dir}: a LoRA adapter but the sidecar names no base_checkpoint to put it on.")
        base = source.causal_lm(meta.base_model, dtype)
        return load_adapter(base, av_dir, is_trainable=is_trainable, adapter_name=adapter_name)
    if not (av_dir / "config.json").is_file():
        raise SidecarError(
            f"{av_dir}: neither a LoRA adapter (adapter_config.json) nor an HF model folder (config.json)."
        )
    return source.causal_lm(str(av_dir), dtype)


def load_av(
    path: str | Path,
    device: str = "auto",
    dtype: str = "float32",
    max_new_tokens: int = 64,
    source: ModelSource = ModelSource(),
) -> Verbalizer:
    """Load an AV (ours or the reference release format), verified against the live tokenizer."""
    av_dir = role_folder(path, AV_SUBDIR)
    if not av_dir.is_dir():
        raise SidecarError(f"AV checkpoint {av_dir} not found: run `nla train-av` or pass --av_checkpoint DIR.")
    meta = read_av_meta(av_dir)
    scale = injection_scale_of(meta, str(av_dir))
    has_tokenizer = (av_dir / "tokenizer_config.json").is_file()
    tokenizer = source.tokenizer(str(av_dir) if has_tokenizer else meta.base_model)
    model = load_av_model(av_dir, meta, dtype, source=source)
    meta.verify(tokenizer, d_model=model.get_input_embeddings().weight.shape[-1], where=str(av_dir / MODEL_META))
    model = model.to(pick_device(device)).eval()
    return Verbalizer(model, tokenizer, meta, scale, max_new_tokens)
