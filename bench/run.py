"""Speed benchmarks on the embedded model; every ratio is measured inside one run.

    python bench/run.py --quick                       # a few minutes on 2 CPU cores
    python bench/run.py --dtype bfloat16 --out bench.json
    python bench/run.py --quick --model DIR           # any local HF folder (tests use a tiny one)
    python bench/run.py --only engines --vllm --rl_n 2 --rl_group 8 --rl_tokens 36   # the demo's RL batch

Prints one line per measurement and, last, one JSON object. Keys:
  injection_overhead_ratio  batched greedy generate with the InjectionHook on / off (same batch,
                            same prompt, min_new_tokens == max_new_tokens), median of interleaved pairs
  extraction_tokens_per_s   block_output(layer K) on batches of builtin-corpus text (real tokens/s)
  ar_samples_per_s          AR LoRA training forward + backward + AdamW step, rows/s
  av_sft_tokens_per_s       AV LoRA SFT (vector injected) forward + backward + step, real tokens/s
  av_sft_prefix_speedup     that step without / with the shared prompt prefix (the prompt before the
                            marker computed once per batch), median of interleaved pairs
  rl_step_s                 one JointTrainer.step on n vectors x G samples (median)
  rl_overhead_ratio         that step / the sum of its parts, each one of JointTrainer's own phase
                            methods called alone on the same state and seed (rollout; AV forward and
                            backward; AR forward and backward; the reference forward when kl_coef > 0):
                            what the step adds on top (rewards, optimizer steps, metrics) stays small
  rollout_tokens_per_s_hf / _vllm_merged / _vllm_adapter   (--vllm, or `make vllm` done) G samples
                            per vector at the RL temperature from the same AV and vectors, generated
                            tokens/s, median of rotated rounds (A B C, B C A, ...); start-up excluded;
                            the vllm engine synced each way (--rl_engine_sync merged / adapter)
  rollout_engine_speedup    vllm (merged) / hf tokens per second; vllm_engine_start_s reported apart
  rl_step_s_hf / _vllm_merged / _vllm_adapter   one JointTrainer.step with each engine (a vllm step
                            includes its weight sync, rl_sync_s_merged / _adapter), rotated, median;
                            adapter_vs_merged_step_ratio their ratio
  sync_bytes_merged / _adapter   bytes one sync writes: the whole merged model, or the AV's adapter
  peak_rss_mb, machine info and the exact command.
The budget targets (injection <= 1.03, RL <= 1.3) are checked here and reported as `*_met`,
never asserted by timed tests. Nothing is written unless asked: --out FILE (JSON), --append (a section
at the end of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nla.core import templates
from nla.core.config import RLConfig
from nla.core.sidecar import Meta
from nla.data.corpus import BUILTIN, iter_documents
from nla.data.extract import choose_marker
from nla.models.ar import ARModel, build_ar, identity_head
from nla.models.av import (
    IGNORE,
    Verbalizer,
    build_generation_batch,
    build_sft_batch,
    prompt_ids,
    response_logprobs,
    shared_prefix_length,
)
from nla.models.backbone import block_output, decoder_layers
from nla.models.injection import InjectionHook
from nla.models.lora import lora_config
from nla.models.sources import load_causal_lm, load_tokenizer, resolve_model
from nla.train.grpo import AR, AV, AV_REF, JointTrainer, adapter_parameters

ROOT = Path(__file__).resolve().parents[1]  # where --append finds docs/benchmarks.md

TARGETS = {"injection_overhead_ratio": 1.03, "rl_overhead_ratio": 1.3}
EXPLANATION = "a Python tutorial; defining a function; the next line is its body"


@dataclass
class Sizes:
    """Workload sizes. `quick` is a few minutes on 2 cores; `tiny` is for the test on a 4-layer model."""

    gen_batch: int = 16
    gen_tokens: int = 32
    repeats: int = 5
    text_batch: int = 8
    text_tokens: int = 128
    train_batch: int = 8
    train_steps: int = 3
    rl_n: int = 4
    rl_group: int = 4
    rl_tokens: int = 48
    rl_repeats: int = 3  # the first is a warm-up and is dropped
    kl_coef: float = 0.01  # RLConfig's default: the reference forward is part of the step
    lora_r: int = 8
    layer: int = 20

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            gen_batch=8,
            gen_tokens=16,
            repeats=5,
            text_batch=4,
            text_tokens=64,
            train_batch=4,
            train_steps=2,
            rl_n=2,
            rl_group=4,
            rl_tokens=24,
            rl_repeats=3,
        )

    @classmethod
    def tiny(cls) -> Sizes:
        return cls(
            gen_batch=2,
            gen_tokens=3,
            repeats=2,
            text_batch=2,
            text_tokens=16,
            train_batch=2,
            train_steps=1,
            rl_n=2,
            rl_group=2,
            rl_tokens=4,
            rl_repeats=2,
            lora_r=2,
            layer=1,
        )


@dataclass
class Context:
    model_path: str
    dtype: str
    tokenizer: Any
    meta: Meta
    layer: int
    d_model: int
    scale: float


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_context(model_path: str, dtype: str, layer: int) -> Context:
    """Tokenizer, a marker that is one token in it, and an AV sidecar for the benchmark model."""
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, dtype)
    d, n_layers = model.config.hidden_size, len(decoder_layers(model))
    layer = min(layer, n_layers - 1)
    spec = choose_marker(tokenizer, set(), set())
    meta = Meta(kind="nla_model", tokens=spec, d_model=d, layer_index=layer, base_model=model_path)
    return Context(model_path, dtype, tokenizer, meta, layer, d, scale=float(math.sqrt(d)))


def real_texts(tokenizer, n: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n builtin-corpus documents cut to max_tokens, right-padded: (ids [n, t], mask [n, t])."""
    rows = [
        tokenizer.encode(doc.text, add_special_tokens=False)[:max_tokens] for doc in iter_documents(BUILTIN, max_docs=n)
    ]
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


# ---------------------------------------------------------------- measurements


def bench_injection(ctx: Context, s: Sizes) -> dict[str, float]:
    """Greedy generate of exactly gen_tokens new tokens, hook on vs off; median of per-pair ratios."""
    from transformers import GenerationConfig

    model = load_causal_lm(ctx.model_path, ctx.dtype).eval()
    ids, mask = build_generation_batch(ctx.tokenizer, s.gen_batch, ctx.meta)
    gen = GenerationConfig(
        max_new_tokens=s.gen_tokens,
        min_new_tokens=s.gen_tokens,
        do_sample=False,
        top_p=None,
        top_k=None,
        temperature=None,
        pad_token_id=ctx.tokenizer.pad_token_id,
        eos_token_id=ctx.tokenizer.eos_token_id,
    )
    hook = InjectionHook(model, *ctx.meta.tokens.ids, ctx.scale)
    vectors = torch.randn(s.gen_batch, ctx.d_model, generator=torch.Generator().manual_seed(0))

    def plain() -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)

    def injected() -> None:
        hook.set_vectors(vectors)
        with torch.no_grad(), hook:
            model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        assert hook.injected == s.gen_batch, "the hook did not inject: the benchmark would be meaningless"

    plain(), injected()  # warm-up
    on, off = [], []
    for i in range(s.repeats):  # interleaved, order alternating, so drift on a shared machine cancels
        if i % 2:
            on.append(timed(injected)), off.append(timed(plain))
        else:
            off.append(timed(plain)), on.append(timed(injected))
    ratio = statistics.median(a / b for a, b in zip(on, off))
    new_tokens = s.gen_batch * s.gen_tokens
    hook_s = hook_seconds_per_generate(model, hook, ids, vectors, s.gen_tokens)
    return {
        "injection_overhead_ratio": ratio,
        "injection_hook_cost_ratio": 1.0 + hook_s / statistics.median(off),
        "injection_hook_s_per_generate": hook_s,
        "generate_plain_s": statistics.median(off),
        "generate_injected_s": statistics.median(on),
        "generate_new_tokens_per_s": new_tokens / statistics.median(off),
    }


def hook_seconds_per_generate(
    model, hook: InjectionHook, ids: torch.Tensor, vectors: torch.Tensor, new_tokens: int, repeats: int = 20
) -> float:
    """The hook's own time in one generate: its prompt call ([b, t]) + new_tokens - 1 decode calls ([b, 1]).

    Timed by calling the hook function directly, so it is immune to the load noise that limits
    the end-to-end ratio to about +-2% on a shared machine.
    """
    emb = model.get_input_embeddings()
    with torch.no_grad():
        prompt_embeds, step_embeds = emb(ids), emb(ids[:, -1:])
    hook.set_vectors(vectors)
    prompt = min(timed(lambda: hook.on_embeddings(emb, (ids,), {}, prompt_embeds)) for _ in range(repeats))
    step = min(timed(lambda: hook.on_embeddings(emb, (ids[:, -1:],), {}, step_embeds)) for _ in range(repeats))
    return prompt + (new_tokens - 1) * step


def bench_extraction(ctx: Context, s: Sizes) -> dict[str, float]:
    model = load_causal_lm(ctx.model_path, ctx.dtype).eval()
    ids, mask = real_texts(ctx.tokenizer, s.text_batch, s.text_tokens)

    def run() -> None:
        with torch.no_grad():
            block_output(model, ids, mask, ctx.layer)

    run()
    seconds = statistics.median(timed(run) for _ in range(max(1, s.repeats // 2)))
    return {"extraction_tokens_per_s": float(mask.sum()) / seconds}


def bench_ar(ctx: Context, s: Sizes) -> dict[str, float]:
    """AR training step (truncated LoRA backbone + head, MSE to random targets) in rows/s."""
    torch.manual_seed(0)
    ar = build_ar(ctx.model_path, ctx.layer, s.lora_r, ctx.dtype)
    ar.train()
    opt = torch.optim.AdamW(ar.trainable_parameters(), lr=1e-4)
    inputs = ar.encode([f"{EXPLANATION} {i}" for i in range(s.train_batch)], ctx.tokenizer)
    targets = torch.randn(s.train_batch, ctx.d_model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = (ar(inputs.input_ids, inputs.attention_mask) - targets).pow(2).mean()
        loss.backward()
        opt.step()

    step()
    seconds = statistics.median(timed(step) for _ in range(s.train_steps))
    return {"ar_samples_per_s": s.train_batch / seconds}


def bench_av_sft(ctx: Context, s: Sizes) -> dict[str, float]:
    """AV LoRA SFT step with the vector injected (the loss train_av uses), real tokens/s."""
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(ctx.model_path, ctx.dtype), lora_config(s.lora_r), adapter_name=AV)
    model.train()
    hook = InjectionHook(model, *ctx.meta.tokens.ids, ctx.scale)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    responses = [templates.av_response(f"{EXPLANATION}, case {i}") for i in range(s.train_batch)]
    batch = build_sft_batch(ctx.tokenizer, prompt_ids(ctx.tokenizer, ctx.meta), responses)
    vectors = torch.randn(s.train_batch, ctx.d_model)
    response = batch["labels"] != IGNORE

    def step(share_prefix: bool = True) -> None:
        opt.zero_grad(set_to_none=True)
        loss = -response_logprobs(
            model, batch["input_ids"], batch["attention_mask"], response, vectors, hook, share_prefix=share_prefix
        ).sum()
        (loss / response.sum()).backward()
        opt.step()

    step()
    step(False)
    shared, unshared = [], []
    for _ in range(s.train_steps):  # interleaved, so load changes hit both alike
        shared.append(timed(step))
        unshared.append(timed(lambda: step(False)))
    seconds = statistics.median(shared)
    return {
        "av_sft_tokens_per_s": float(batch["attention_mask"].sum()) / seconds,
        "av_sft_prefix_speedup": statistics.median(unshared) / seconds,
    }


def joint_setup(ctx: Context, s: Sizes) -> tuple[JointTrainer, Any, Verbalizer, ARModel, RLConfig]:
    """One base model with fresh LoRA adapters av, av_ref, ar (as nla/stages/rl.py's load_joint, in memory)."""
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(ctx.model_path, ctx.dtype), lora_config(s.lora_r), adapter_name=AV)
    model.add_adapter(AV_REF, lora_config(s.lora_r))
    model.add_adapter(AR, lora_config(s.lora_r, layers=list(range(ctx.layer + 1))))
    ar = ARModel(model, ctx.layer, identity_head(ctx.d_model))
    verbalizer = Verbalizer(model, ctx.tokenizer, ctx.meta, ctx.scale, s.rl_tokens)
    cfg = RLConfig(rl_batch_size=s.rl_n, rl_group_size=s.rl_group, rl_max_new_tokens=s.rl_tokens, rl_kl_coef=s.kl_coef)
    av_opt = torch.optim.AdamW(adapter_parameters(model, AV), lr=1e-5)
    ar_opt = torch.optim.AdamW(adapter_parameters(model, AR) + [ar.head.weight], lr=1e-5)
    trainer = JointTrainer(model, verbalizer, ar, ctx.tokenizer, cfg, math.sqrt(ctx.d_model), 1.0, av_opt, ar_opt)
    return trainer, model, verbalizer, ar, cfg


def rl_parts(trainer: JointTrainer, vectors: torch.Tensor, seed: int) -> dict[str, float]:
    """The step's essential work, each of the trainer's own phases called alone on the same state and
    seed, with no optimizer step: the rollout (sampling and parsing), the reference forward (when
    kl_coef > 0), the AV's forward and backward, the AR's forward and backward."""
    seconds = {}
    torch.manual_seed(seed)
    start = time.perf_counter()
    ro = trainer.rollout(vectors)
    seconds["rollout"] = time.perf_counter() - start
    if trainer.cfg.rl_kl_coef > 0:
        with torch.no_grad():
            seconds["av_ref_forward"] = timed(lambda: trainer.av_logprobs(ro, AV_REF))
    trainer.model.train()
    seconds["av_forward_backward"] = timed(lambda: trainer.av_logprobs(ro).sum().backward())
    seconds["ar_forward_backward"] = timed(lambda: trainer.score(ro))  # its backward included
    trainer.model.zero_grad(set_to_none=True)
    trainer.ar.head.zero_grad(set_to_none=True)
    return seconds


def rotated(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """`repeats` rounds of one measurement each, the order rotating every round (A B C, B C A, ...) so
    a load that changes during the run hits all alike. Each callable returns its own number."""
    names, out = list(fns), {name: [] for name in fns}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out[name].append(fns[name]())
    return out


def bench_engines(ctx: Context, s: Sizes, vllm_python: str) -> dict[str, float]:
    """hf vs vllm rollouts (tokens/s) and RL steps, the vllm engine synced both ways
    (--rl_engine_sync merged and adapter), from one AV and one set of vectors, rotated."""
    from nla.models.engines import HFEngine, VLLMEngine, lora_rank_for

    trainer, model, verbalizer, _, cfg = joint_setup(ctx, s)
    with torch.no_grad():  # a LoRA that changes the output, so the engine must hold the AV's weights
        for p in adapter_parameters(model, AV):
            p.add_(torch.randn_like(p) * 0.01)
    vectors = torch.randn(s.rl_n, ctx.d_model, generator=torch.Generator().manual_seed(1)) * ctx.scale
    engines: dict[str, Any] = {"hf": HFEngine(verbalizer)}
    first_sync = {}
    try:
        for mode in ("merged", "adapter"):
            rank = lora_rank_for(model, AV) if mode == "adapter" else 0
            engines[mode] = VLLMEngine(
                verbalizer, ctx.model_path, vllm_python, ctx.dtype, max_model_len=512, sync_mode=mode, lora_rank=rank
            )
            first_sync[mode] = engines[mode].sync(model, AV, 0)
        model.set_adapter(AV)

        def rate(engine) -> Callable[[], float]:
            def run() -> float:
                start = time.perf_counter()
                ro = engine.rollout(vectors, s.rl_group, 0.7, s.rl_tokens)
                return float(ro.response_mask.sum()) / (time.perf_counter() - start)

            return run

        for engine in engines.values():  # warm-up
            rate(engine)()
        tokens = rotated({name: rate(e) for name, e in engines.items()}, s.rl_repeats)
        syncs: dict[str, list[float]] = {"merged": [], "adapter": []}

        def step(name: str) -> Callable[[], float]:
            def run() -> float:  # every step updates the AV, so the next one syncs it
                trainer.engine = engines[name]
                torch.manual_seed(0)
                out = trainer.step(vectors)
                if name in syncs:
                    syncs[name].append(out.metrics["rl/time_sync_s"])
                return sum(v for k, v in out.metrics.items() if k.startswith("rl/time_"))

            return run

        steps = rotated({name: step(name) for name in engines}, s.rl_repeats)
    finally:
        for engine in engines.values():
            engine.close()
    med = statistics.median
    out = {
        "rollout_tokens_per_s_hf": med(tokens["hf"]),
        "rl_step_s_hf": med(steps["hf"]),
        "engine_rows": float(s.rl_n * s.rl_group),
        "vllm_version": engines["merged"].vllm_version,
        "vllm_engine_start_s": engines["merged"].start_s,
    }
    for mode in ("merged", "adapter"):
        out |= {
            f"rollout_tokens_per_s_vllm_{mode}": med(tokens[mode]),
            f"rl_step_s_vllm_{mode}": med(steps[mode]),
            f"rl_sync_s_{mode}": med(syncs[mode]),
            f"sync_bytes_{mode}": float(engines[mode].sync_bytes),
            f"vllm_first_sync_s_{mode}": first_sync[mode],
        }
    out["rollout_engine_speedup"] = out["rollout_tokens_per_s_vllm_merged"] / out["rollout_tokens_per_s_hf"]
    out["adapter_vs_merged_step_ratio"] = out["rl_step_s_vllm_adapter"] / out["rl_step_s_vllm_merged"]
    return out


def bench_rl(ctx: Context, s: Sizes) -> dict[str, float]:
    """Per repeat: the parts alone, then one JointTrainer.step from the same state and seed."""
    trainer = joint_setup(ctx, s)[0]
    vectors = torch.randn(s.rl_n, ctx.d_model, generator=torch.Generator().manual_seed(1)) * ctx.scale
    steps, sums, parts = [], [], []
    for r in range(s.rl_repeats):
        p = rl_parts(trainer, vectors, seed=100 + r)
        torch.manual_seed(100 + r)
        step_s = timed(lambda: trainer.step(vectors))
        if r == 0 and s.rl_repeats > 1:
            continue  # warm-up
        steps.append(step_s), sums.append(sum(p.values())), parts.append(p)
    out = {
        "rl_step_s": statistics.median(steps),
        "rl_overhead_ratio": statistics.median(a / b for a, b in zip(steps, sums)),
    }
    for key in parts[0]:
        out[f"rl_part_{key}_s"] = statistics.median(p[key] for p in parts)
    out["rl_rows"] = s.rl_n * s.rl_group
    return out


def bench_memory(ctx: Context, s: Sizes) -> dict[str, float]:
    """`nla plan`'s estimate against the tensor memory a real RL step holds (nla.train.memory):
    each phase alone (rollout; AV reference forward + AV forward and backward; AR forward and
    backward), one whole JointTrainer.step, and the step again with rl_micro_batch a quarter of its
    rollouts, fed the lengths the rollout produced."""
    from nla.core.config import ARConfig, AVConfig, ModelConfig, NLAConfig
    from nla.models.sources import meta_model
    from nla.stages.plan import FLOAT32, arch_of, estimate
    from nla.train.memory import TensorPeak

    trainer, model, _, _, rl = joint_setup(ctx, s)
    vectors = torch.randn(s.rl_n, ctx.d_model, generator=torch.Generator().manual_seed(1)) * ctx.scale
    measured = {}
    torch.manual_seed(0)
    with TensorPeak() as m:
        ro = trainer.rollout(vectors)
    measured["rollout"] = m.peak
    trainer.model.train()
    with TensorPeak() as m:
        with torch.no_grad():
            trainer.av_logprobs(ro, AV_REF)
        trainer.av_logprobs(ro).sum().backward()
    measured["av"] = m.peak
    with TensorPeak() as m:
        trainer.score(ro)  # forward and backward
    measured["ar"] = m.peak
    model.zero_grad(set_to_none=True)
    trainer.ar.head.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with TensorPeak() as m:
        trainer.step(vectors)
    measured["step"] = m.peak
    rows = s.rl_n * s.rl_group
    micro = max(1, rows // 4)  # the same step a quarter of the rollouts per forward and backward
    trainer.cfg = dataclasses.replace(trainer.cfg, rl_micro_batch=micro)
    torch.manual_seed(0)
    with TensorPeak() as m:
        trainer.step(vectors)  # AdamW's moments exist now: only gradients and activations are new
    measured["step_micro"] = m.peak

    r = ro.rollout
    ids, mask = build_generation_batch(ctx.tokenizer, 2, ctx.meta)
    marker = ctx.meta.tokens.injection_token_id
    suffix = ids.shape[1] - shared_prefix_length(ids, mask, marker, ids[0].tolist().index(marker))
    ar_tokens = trainer.ar.encode([e or "" for e in ro.explanations], ctx.tokenizer).input_ids.shape[1]
    cfg = NLAConfig(
        model=ModelConfig(dtype=ctx.dtype, layer=ctx.layer),
        ar=ARConfig(ar_lora_r=s.lora_r),
        av=AVConfig(av_lora_r=s.lora_r),
        rl=dataclasses.replace(rl, rl_val_rows=0),  # the bench's trainer has no SFT AR to score with
    )
    a = arch_of(meta_model(ctx.model_path))
    new = r.sequences.shape[1] - r.prompt_len
    plan = estimate(a, cfg, r.prompt_len, suffix, ar_tokens, new_tokens=new)
    phases, trainer_plan = plan["phases"], plan["trainer"]
    cfg.rl = dataclasses.replace(cfg.rl, rl_micro_batch=micro)
    micro_phases = estimate(a, cfg, r.prompt_len, suffix, ar_tokens, new_tokens=new)["phases"]
    av_lora, ar_trained = s.lora_r * sum(a.lora_widths), s.lora_r * sum(a.lora_widths[: ctx.layer + 1]) + a.d_model**2
    estimated = {
        "rollout": phases["rollout (hf generate)"],
        "av": phases["AV update"] + FLOAT32 * av_lora,  # + the AV's gradients
        "ar": phases["AR update"] + FLOAT32 * ar_trained,  # + the AR's
        "step": trainer_plan["gradients + AdamW"] + max(phases.values()),
        "step_micro": trainer_plan["gradients + AdamW"] / 3 + max(micro_phases.values()),  # gradients alone
    }
    out: dict[str, float] = {}
    for k in measured:
        out[f"memory_measured_mb_{k}"] = measured[k] / 2**20
        out[f"memory_estimated_mb_{k}"] = estimated[k] / 2**20
        out[f"memory_estimate_ratio_{k}"] = estimated[k] / measured[k]
    out["memory_estimate_within_25pct"] = all(
        0.75 <= out[f"memory_estimate_ratio_{k}"] <= 1.25 for k in ("av", "ar", "step", "step_micro")
    )
    return out


# ---------------------------------------------------------------- report


def machine_info(dtype: str) -> dict[str, Any]:
    import transformers

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    try:
        bf16 = bool(torch.cpu._is_avx512_bf16_supported())  # private API; absent on some builds
    except AttributeError:
        bf16 = None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": dtype,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu_bf16_supported": bf16,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run_all(
    model_path: str,
    dtype: str,
    sizes: Sizes,
    log: Callable[[str], None] = print,
    vllm_python: str | None = None,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Every measurement (or those in `only`) on the model at `model_path`; the engine comparison
    when `vllm_python` is given. Returns the flat result dict (no files written)."""
    ctx = make_context(model_path, dtype, sizes.layer)
    result: dict[str, Any] = {"model": model_path, "layer": ctx.layer, "sizes": vars(sizes).copy()}
    parts = [
        ("injection", bench_injection),
        ("extraction", bench_extraction),
        ("ar", bench_ar),
        ("av_sft", bench_av_sft),
        ("rl", bench_rl),
        ("memory", bench_memory),
    ]
    if vllm_python:
        parts.append(("engines", lambda c, s: bench_engines(c, s, vllm_python)))
    for name, fn in parts:
        if only and name not in only:
            continue
        start = time.perf_counter()
        part = fn(ctx, sizes)
        result.update(part)
        log(
            f"[bench] {name:<10} {time.perf_counter() - start:6.1f}s  "
            + "  ".join(f"{k}={v:.4g}" for k, v in part.items() if isinstance(v, (int, float)))
        )
    for key, limit in TARGETS.items():
        if key not in result:
            continue
        result[key.replace("_ratio", "_target")] = limit
        result[key.replace("_ratio", "_met")] = bool(result[key] <= limit)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result.update(machine_info(dtype))
    return result


DOC_HEADER = """
## Speed benchmarks (`bench/run.py`)

Sections below are appended by `python bench/run.py` (one per run: machine, command, load, results).
Ratios are measured within one run; absolute speeds depend on the machine and its load.

GPU: no GPU was lent to this task, so every number here is CPU. Not measured, from reading only
(unverified): RL rollouts are plain autoregressive sampling, the bulk of a step on a GPU, and an
inference engine would speed them up only if it accepts the injected vector. trl's vLLM mode sends
token ids (prompts) to the server, so the injected embedding would be lost; vLLM and SGLang accept
prompt embeddings (`prompt_embeds` / `input_embeds`) in some versions, which would let the rollout
send the AV prompt with the marker row already replaced, at the cost of syncing the AV LoRA
weights to the engine every step. Until that is verified, rollouts use HF `generate` with the
embedding hook.
"""


def markdown(result: dict[str, Any], load: tuple[float, float]) -> str:
    keys = [
        "injection_overhead_ratio",
        "injection_overhead_met",
        "injection_hook_cost_ratio",
        "extraction_tokens_per_s",
        "ar_samples_per_s",
        "av_sft_tokens_per_s",
        "rl_step_s",
        "rl_overhead_ratio",
        "rl_overhead_met",
        "generate_new_tokens_per_s",
        "rollout_tokens_per_s_hf",
        "rollout_tokens_per_s_vllm_merged",
        "rollout_tokens_per_s_vllm_adapter",
        "rollout_engine_speedup",
        "vllm_engine_start_s",
        "rl_step_s_hf",
        "rl_step_s_vllm_merged",
        "rl_step_s_vllm_adapter",
        "adapter_vs_merged_step_ratio",
        "rl_sync_s_merged",
        "rl_sync_s_adapter",
        "sync_bytes_merged",
        "sync_bytes_adapter",
        "peak_rss_mb",
    ]
    keys = [k for k in keys if k in result]
    rows = "\n".join(
        f"| `{k}` | {result[k]:.4g} |" if isinstance(result[k], float) else f"| `{k}` | {result[k]} |" for k in keys
    )
    machine = ", ".join(
        f"{k}={result[k]}"
        for k in [
            "cpu",
            "cpu_count",
            "torch_threads",
            "torch",
            "transformers",
            "dtype",
            "device",
            "cpu_bf16_supported",
            "gpu",
        ]
    )
    return (
        f"\n### bench/run.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {result['dtype']}\n\n"
        f"Command: `{result['command']}`  \nMachine: {machine}; load average (1 min) {load[0]:.2f} before, "
        f"{load[1]:.2f} after  \nSizes: {result['sizes']}\n\n| key | value |\n|---|---|\n{rows}\n\n"
        f"```json\n{json.dumps(result, sort_keys=True)}\n```\n"
    )


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="NLA speed benchmarks (ratios measured in one run).")
    ap.add_argument("--quick", action="store_true", help="small sizes: a few minutes on 2 CPU cores")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--model", default="embedded:smollm2-135m", help="embedded:NAME or a local HF model folder")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="also write the JSON object to this file")
    ap.add_argument(
        "--append", action="store_true", help="also append a section with the results to docs/benchmarks.md"
    )
    ap.add_argument(
        "--vllm",
        nargs="?",
        const="",
        default=None,
        metavar="PYTHON",
        help="also compare the hf and vllm rollout engines (PYTHON: the vLLM environment's python; "
        "default $NLA_VLLM_PYTHON or .venv-vllm/bin/python)",
    )
    ap.add_argument(
        "--only", default=None, help="comma-separated parts: injection,extraction,ar,av_sft,rl,memory,engines"
    )
    ap.add_argument("--rl_n", type=int, default=None, help="vectors per RL step / engine rollout (default: the sizes')")
    ap.add_argument("--rl_group", type=int, default=None, help="samples per vector")
    ap.add_argument("--rl_tokens", type=int, default=None, help="rollout length cap")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sizes = Sizes.quick() if args.quick else Sizes()
    for key in ("rl_n", "rl_group", "rl_tokens"):
        if getattr(args, key) is not None:
            setattr(sizes, key, getattr(args, key))
    vllm_python = None
    if args.vllm is not None:
        from nla.models.engines import find_vllm_python

        vllm_python = find_vllm_python(args.vllm or None)
    load_before = os.getloadavg()[0]
    result = run_all(
        resolve_model(args.model),
        args.dtype,
        sizes,
        vllm_python=vllm_python,
        only=args.only.split(",") if args.only else None,
    )
    result["command"] = shlex.join(["python", "bench/run.py", *argv])
    load = (load_before, os.getloadavg()[0])
    result["load_avg_1m"] = list(load)
    if args.out:
        from nla.core.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, sort_keys=True) + "\n")
    if args.append:
        # One append-mode write, not read-modify-replace: colleagues may be editing the same file.
        doc = ROOT / "docs" / "benchmarks.md"
        header = "" if doc.is_file() and "(`bench/run.py`)" in doc.read_text(encoding="utf-8") else DOC_HEADER
        with open(doc, "a", encoding="utf-8") as f:
            f.write(header + markdown(result, load))
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
