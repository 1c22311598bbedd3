"""`nla plan`: the memory a joint RL run needs per process, on paper, before anything is loaded.

    nla plan --config configs/qwen2.5-7b-l20.yaml --gpu_memory_gb 80

Reads only the model's config (a local folder or a config already in the HF cache) and builds the
model on the meta device, so every shape is the real one and no weight is read. Per process it
prints the trainer's memory (the shared base in --dtype, the four LoRA adapters and two AR heads in
float32 as peft keeps them, gradients and AdamW moments of what trains, and the activations of the
largest phase of a step) and the vllm engine's (a second copy of the weights and its KV cache),
then whether that fits a GPU of --gpu_memory_gb with trainer and engine on one GPU or on two.

The activation count is written out in `layer_activation_bytes` (what autograd keeps per token per
block of a LoRA-adapted decoder with a frozen base; no activation checkpointing, which joint RL
does not use). It is checked against the tensor memory a real step holds (`nla.train.memory`) on
tiny models of two architectures and on the embedded model (tests, docs/benchmarks.md). Not
modelled: the framework's own context (CUDA, vLLM's graphs and workspace, about 1-3 GB on a GPU),
allocator fragmentation, and sharded (FSDP) layouts, for which divide the weights by the shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nla.core.config import ConfigError, NLAConfig, parse_config
from nla.models.backbone import decoder_layers, text_config
from nla.models.lora import NOT_LANGUAGE_MODEL, TARGET_MODULES

GIB = 2**30
FLOAT32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
AR_TEMPLATE_TOKENS = 16  # about the AR prompt's tokens around an explanation (chat template, instruction)
DEFAULT_PROMPT_TOKENS = 48  # the AV prompt when no tokenizer is at hand to count it
DEFAULT_SUFFIX_TOKENS = 12  # of which from the marker's left neighbour on (the rest is a shared prefix)


@dataclass
class PlanArgs:
    gpu_memory_gb: float = field(
        default=0.0, metadata={"help": "Say whether the run fits a GPU of this many GiB (0: only print the table)."}
    )
    prompt_tokens: int = field(
        default=0,
        metadata={"help": "The AV prompt's length in tokens (0: count it with the model's tokenizer, else assume 48)."},
    )


@dataclass
class Arch:
    """What the memory depends on, read from a model built on the meta device."""

    name: str
    layers: int
    d_model: int
    kv_dim: int  # key (= value) width: kv heads x head size
    intermediate: int
    vocab: int
    params: int  # every weight the model loads (a vision tower too), tied ones once
    lora_widths: list[int] = field(default_factory=list)  # per block: sum of in + out over LoRA's targets


def arch_of(model) -> Arch:
    import re

    cfg = text_config(model.config)
    seen, params = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    widths = []
    for block in decoder_layers(model):
        width = 0
        for name, m in block.named_modules():
            if name.rsplit(".", 1)[-1] in TARGET_MODULES and not re.fullmatch(NOT_LANGUAGE_MODEL, name):
                width += m.in_features + m.out_features
        widths.append(width)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return Arch(
        name=type(model).__name__,
        layers=len(widths),
        d_model=cfg.hidden_size,
        kv_dim=kv_heads * head_dim,
        intermediate=cfg.intermediate_size,
        vocab=cfg.vocab_size,
        params=params,
        lora_widths=widths,
    )


def layer_activation_bytes(a: Arch, dtype_bytes: int, lora_r: int) -> int:
    """Bytes autograd keeps per new token per block while training LoRA (float32 adapters) on a
    frozen base; keys and values are `attention_kv_bytes`'. Besides each LoRA's A output (7 r,
    float32): in a float32 base the two residual-stream tensors the norms read and the two norm
    outputs the LoRAs read (4d), the rotated queries, the attention's output and the copy o_proj
    reads (3d), the MLP's gate, up, activation and product (4 intermediate). In a 16-bit base the
    norms and LoRAs keep float32 copies of their inputs instead (norms 2d, q/k/v/o/gate/up 6d, down
    intermediate), and the base keeps the queries and the attention's output (2d) and the gate, up
    and activation (3 intermediate) in its own dtype."""
    d, i = a.d_model, a.intermediate
    if dtype_bytes >= FLOAT32:
        return FLOAT32 * (7 * d + 4 * i + 7 * lora_r)
    return dtype_bytes * (2 * d + 3 * i) + FLOAT32 * (8 * d + i + 7 * lora_r)


def attention_kv_bytes(a: Arch, rows: int, context: int, dtype_bytes: int, layers: int) -> int:
    """Keys and values attention keeps for backward over the whole context (a shared prefix's cache
    included): the cache itself, and with grouped-query attention the copies expanded to every
    head, which transformers makes whenever an attention mask is passed (RL always passes one)."""
    per_token = 2 * a.kv_dim + (2 * a.d_model if a.kv_dim < a.d_model else 0)
    return rows * context * layers * per_token * dtype_bytes


def logits_bytes(a: Arch, rows: int, positions: int, dtype_bytes: int) -> int:
    """At the backward's start: the float32 log-softmax of the response positions' logits, the
    gradient arriving at it and the one leaving it, and (16-bit base) that gradient cast back."""
    copies = 3 * FLOAT32 + (dtype_bytes if dtype_bytes < FLOAT32 else 0)
    return rows * positions * a.vocab * copies


def kv_cache_bytes(a: Arch, rows: int, tokens: int, dtype_bytes: int, layers: int | None = None) -> int:
    return rows * tokens * (layers or a.layers) * 2 * a.kv_dim * dtype_bytes


def layer_of(cfg: NLAConfig, a: Arch) -> int:
    from nla.models.backbone import default_layer

    return default_layer(a.layers) if cfg.model.layer is None else cfg.model.layer


def estimate(
    a: Arch,
    cfg: NLAConfig,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    suffix_tokens: int = DEFAULT_SUFFIX_TOKENS,
    ar_tokens: int | None = None,
    with_ar_ref: bool | None = None,
    new_tokens: int | None = None,
) -> dict[str, Any]:
    """Bytes per process of a joint RL step with `cfg`'s sizes -> {trainer, engine, phases}. Rollouts
    are taken at full length (`new_tokens`: rl_max_new_tokens), the AR's input at that plus its
    template (`ar_tokens`); a check against a measured step passes the lengths it saw."""
    rc, b = cfg.rl, DTYPE_BYTES[cfg.model.dtype]
    r, k, d = cfg.av.av_lora_r, layer_of(cfg, a), a.d_model
    rows, new = rc.rl_batch_size * rc.rl_group_size, new_tokens or rc.rl_max_new_tokens
    ar_tokens = ar_tokens or new + AR_TEMPLATE_TOKENS
    av_lora = r * sum(a.lora_widths)
    ar_lora = cfg.ar.ar_lora_r * sum(a.lora_widths[: k + 1])
    with_ar_ref = rc.rl_val_rows > 0 if with_ar_ref is None else with_ar_ref
    heads = 1 + int(with_ar_ref)
    trainable = av_lora + ar_lora + d * d
    per_block = layer_activation_bytes(a, b, r)
    micro = min(rows, rc.rl_micro_batch or rows)  # the rows one forward and backward holds
    # The prompt before the marker is the same for every row: with more than one row per forward it
    # runs once (one row, its activations kept for the gradient) and its cache is repeated.
    prefix = prompt_tokens - suffix_tokens if micro > 1 else 0
    av_tokens = prompt_tokens - prefix + new
    phases = {
        "rollout (hf generate)": kv_cache_bytes(a, rows, prompt_tokens + new, b) + rows * a.vocab * FLOAT32 * 2,
        "AV update": (micro * av_tokens + prefix) * a.layers * per_block
        + attention_kv_bytes(a, micro, prefix + av_tokens, b, a.layers)
        + logits_bytes(a, micro, new, b),
        "AR update": micro * ar_tokens * (k + 1) * layer_activation_bytes(a, b, cfg.ar.ar_lora_r)
        + attention_kv_bytes(a, micro, ar_tokens, b, k + 1),
    }
    largest = max(phases, key=phases.get)
    trainer = {
        "weights": a.params * b,
        "adapters": FLOAT32 * (2 * av_lora + heads * ar_lora + heads * d * d),
        "gradients + AdamW": FLOAT32 * 3 * trainable,
        f"activations ({largest})": phases[largest],
    }
    trainer["total"] = sum(trainer.values())
    engine = None
    if rc.rl_rollout_engine == "vllm":
        needed = kv_cache_bytes(a, rows, prompt_tokens + new, b)
        engine = {
            "weights": a.params * b,
            "KV cache (reserved)": int(rc.rl_vllm_memory_gb * GIB),
        }
        engine["total"] = sum(engine.values())
        engine["KV cache one step needs"] = needed
    return {"trainer": trainer, "engine": engine, "phases": phases, "rows": rows, "dtype_bytes": b}


def prompt_length(path: str, layer: int, source) -> tuple[int, int] | None:
    """(prompt tokens, tokens from the marker's left neighbour on) of the AV prompt under this
    model's tokenizer, or None when `path` has no tokenizer (a config alone)."""
    from nla.core.sidecar import Meta
    from nla.data.extract import choose_marker
    from nla.models.av import build_generation_batch, shared_prefix_length

    folder = Path(path)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None  # a config alone (a published model's shape)
    tokenizer = source.tokenizer(path)
    spec = choose_marker(tokenizer, set(), set())
    meta = Meta(kind="nla_model", tokens=spec, d_model=1, layer_index=layer, base_model=path)
    ids, mask = build_generation_batch(tokenizer, 2, meta)
    t = ids.shape[1]
    p = shared_prefix_length(ids, mask, spec.injection_token_id, ids[0].tolist().index(spec.injection_token_id))
    return t, t - p


def table(plan: dict[str, Any], gpu_gb: float) -> str:
    def gib(x: float) -> str:
        return f"{x / GIB:8.2f} GiB"

    lines = ["trainer (per process)"]
    lines += [f"  {k:<34}{gib(v)}" for k, v in plan["trainer"].items()]
    engine = plan["engine"]
    if engine:
        lines.append("vllm engine (per process)")
        lines += [f"  {k:<34}{gib(v)}" for k, v in engine.items()]
        if engine["KV cache one step needs"] > engine["KV cache (reserved)"]:
            lines.append(
                "  the reserved KV cache is smaller than one step's rollouts: vLLM will run them in turns "
                "(slower); --rl_vllm_memory_gb sets it"
            )
    lines.append("step phases (activations)")
    lines += [f"  {k:<34}{gib(v)}" for k, v in plan["phases"].items()]
    if gpu_gb:
        trainer, both = plan["trainer"]["total"], plan["trainer"]["total"] + (engine["total"] if engine else 0)
        fits = lambda x: "fits" if x <= gpu_gb * GIB else "does NOT fit"  # noqa: E731
        lines.append(f"on one {gpu_gb:g} GiB GPU: trainer{' + engine' if engine else ''} {gib(both)}: {fits(both)}")
        if engine:
            lines.append(
                f"engine on a GPU of its own: trainer {gib(trainer)} ({fits(trainer)}), "
                f"engine {gib(engine['total'])} ({fits(engine['total'])})"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from nla.models.sources import ModelSource, meta_model

    cfg, (args,) = parse_config(argv, extra=[PlanArgs])
    source = ModelSource.of(cfg.model)
    path = source.resolve(cfg.model.model)
    model = meta_model(path, cfg.model.trust_remote_code)
    a = arch_of(model)
    layer = layer_of(cfg, a)
    if not 0 <= layer < a.layers:
        raise ConfigError(f"layer {layer} is out of range for {a.name} (blocks 0..{a.layers - 1}).")
    counted = prompt_length(path, layer, source) if not args.prompt_tokens else None
    prompt, suffix = counted or (args.prompt_tokens or DEFAULT_PROMPT_TOKENS, DEFAULT_SUFFIX_TOKENS)
    plan = estimate(a, cfg, prompt, min(suffix, prompt))
    rc = cfg.rl
    print(
        f"nla plan: {cfg.model.model} ({a.name}, {a.params / 1e9:.2f}B parameters, {a.layers} blocks, d {a.d_model}), "
        f"{cfg.model.dtype}, layer {layer}; RL step of {rc.rl_batch_size} x {rc.rl_group_size} rollouts, "
        f"AV prompt {prompt} tokens{'' if counted else ' (assumed)'} + {rc.rl_max_new_tokens} new, "
        f"LoRA r {cfg.av.av_lora_r}/{cfg.ar.ar_lora_r}, micro-batch {rc.rl_micro_batch or 'whole step'}, "
        f"engine {rc.rl_rollout_engine}"
    )
    print(table(plan, args.gpu_memory_gb))
    return 0
