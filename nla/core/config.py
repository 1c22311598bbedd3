"""One dataclass per concern, composed into the config every stage reads.

A single YAML file drives a whole run (`nla datagen`, `nla train-ar`, ... all take the same
file), so field names are unique across the dataclasses and the CLI is flat:

    nla train-ar --config configs/embedded.yaml --ar_lr 1e-4 --output_dir runs/x

We read the YAML (naming an unknown key, a close match and the valid keys, and mapping old option
names through `ALIASES`) and hand it to trl's `TrlParser` as defaults; the CLI overrides them."""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nla.core.claims import ExtractiveFormat

EMBEDDED_MODEL = "embedded:smollm2-135m"
# How a rollout engine gets the AV's weights (models/engines.py).
SYNC_MODES = ("auto", "adapter", "merged")
# Sampling keeps the k likeliest tokens: transformers' generate default, explicit so every engine matches it.
TOP_K = 50


# Old option names, still read on the command line, in YAML configs and in a run's saved config.yaml,
# each with one warning per process (README: "Renamed options"). RL keys all carry the rl_ prefix;
# every generation cap is <who>_max_new_tokens; one name per checkpoint option.
ALIASES: dict[str, str] = {
    "group_size": "rl_group_size",
    "temperature": "rl_temperature",
    "top_k": "rl_top_k",
    "kl_coef": "rl_kl_coef",
    "clip_eps": "rl_clip_eps",
    "reward": "rl_reward",
    "contrastive_coef": "rl_contrastive_coef",
    "length_penalty": "rl_length_penalty",
    "claim_reward": "rl_claim_reward",
    "advantage_norm": "rl_advantage_norm",
    "max_response_tokens": "rl_max_new_tokens",
    "rollout_engine": "rl_rollout_engine",
    "engine_sync": "rl_engine_sync",  # the spelling issue #30 asked for
    "vllm_python": "rl_vllm_python",
    "vllm_memory_gb": "rl_vllm_memory_gb",
    "max_new_tokens": "av_max_new_tokens",
    "av": "av_checkpoint",  # nla eval / verbalize
    "ar": "ar_checkpoint",
}
_warned: set[str] = set()


def current_name(key: str) -> str:
    """The option's name now (an old name warns once, then maps to its new one)."""
    new = ALIASES.get(key)
    if new is None:
        return key
    if key not in _warned:
        _warned.add(key)
        print(f"[nla] option {key!r} is now {new!r}; the old name still works.", file=sys.stderr)
    return new


def _current_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        new = current_name(key)
        if new != key and new in values:
            raise ConfigError(f"{source} sets both {key!r} and its new name {new!r}; keep {new!r}.")
        out[new] = value
    return out


def _current_flag(arg: str) -> str:
    if not arg.startswith("--") or arg == "--":
        return arg
    name, eq, value = arg[2:].partition("=")
    return f"--{current_name(name)}{eq}{value}"


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


class ConfigError(ValueError):
    """A config value is wrong; the message says how to fix it."""


def _positive(section: Any, *names: str) -> None:
    """Counts and intervals that a loop divides by or steps with must be >= 1."""
    for name in names:
        if getattr(section, name) < 1:
            raise ConfigError(f"{name}={getattr(section, name)}: must be >= 1 (an interval or count of steps).")


@dataclass
class RunConfig:
    output_dir: str = _help(
        "Where this run writes data, checkpoints, metrics and the resolved config.", default="runs/default"
    )
    seed: int = _help("Seed for every RNG (positions, splits, sampling, init).", default=0)
    resume: str = _help(
        "'auto': continue from the newest readable checkpoint (its config must match); 'never': start fresh "
        "(refused where checkpoints exist); 'restart': move existing checkpoints aside, start fresh; or a checkpoint path.",
        default="auto",
    )
    device: str = _help("'auto' (cuda if available, else cpu), 'cpu' or 'cuda'.", default="auto")

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}: use 'auto', 'cpu' or 'cuda'.")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():  # Accelerate would otherwise run on the CPU without a word
                raise ConfigError(
                    "device=cuda but no CUDA GPU is visible (torch.cuda.is_available() is False); "
                    "use --device cpu or auto, or check CUDA_VISIBLE_DEVICES and the torch build."
                )


@dataclass
class ModelConfig:
    model: str = _help(
        f"Target LM: '{EMBEDDED_MODEL}' (shipped via PyPI), a local HF folder, or a hub id (needs allow_hub).",
        default=EMBEDDED_MODEL,
    )
    layer: int | None = _help(
        "Block K whose residual output is explained (= hidden_states[K+1]). Default: round(2/3 * n_layers).",
        default=None,
    )
    dtype: str = _help("Compute dtype: float32 or bfloat16.", default="float32")
    allow_hub: bool = _help(
        "Let a hub id reach transformers (downloaded, or read from a pre-filled cache when you set HF_HUB_OFFLINE=1; your HF_* variables are never changed). Off: only local folders and embedded models.",
        default=False,
    )
    trust_remote_code: bool = _help("Pass trust_remote_code to transformers. Only for models you trust.", default=False)
    cache_dir: str | None = _help(
        "Cache for converted models and fetched wheels. Default: $NLA_CACHE or ~/.cache/nla.", default=None
    )
    chat_template: str | None = _help(
        "A Jinja chat template file for a model without one (base models); saved with the AV.", default=None
    )

    def __post_init__(self) -> None:
        if self.chat_template is not None and not Path(self.chat_template).expanduser().is_file():
            raise ConfigError(f"chat_template={self.chat_template!r}: no such file; pass a Jinja chat template file.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype={self.dtype!r}: use float32, bfloat16 or float16.")
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"layer={self.layer}: must be >= 0 (block index, counted from 0).")


@dataclass
class DataConfig:
    corpus: str = _help(
        "'builtin:python-docs', a .txt/.jsonl/.parquet file or folder, or 'hf:NAME[:CONFIG]:SPLIT' (needs allow_hub).",
        default="builtin:python-docs",
    )
    text_field: str = _help("Column/key holding the text in .jsonl/.parquet/HF corpora.", default="text")
    max_docs: int | None = _help("Use at most this many documents (None = all).", default=None)
    max_doc_tokens: int = _help("Documents are truncated to this many tokens before extraction.", default=256)
    positions_per_doc: int = _help("Activation positions sampled per document.", default=4)
    min_position: int = _help("Only positions with token index >= this (early positions have huge norms).", default=50)
    split_fractions: str = _help(
        "Document split av_sft,ar_sft,rl,val,test (normalised to sum 1).", default="0.25,0.25,0.4,0.05,0.05"
    )
    extract_batch_size: int = _help("Documents per extraction forward pass.", default=8)
    data_dir: str | None = _help("Datasets folder (default: <output_dir>/data).", default=None)
    paired_model: str | None = _help(
        "A second model B for a cross-model NLA: datagen also records B's activation at the same place in "
        "each row's text (the B token ending where the row's token ends; rows without one are dropped and "
        "counted), as a dataset of its own under <data_dir>/paired/.",
        default=None,
    )
    paired_layer: int | None = _help("B's block for --paired_model (default: B's ~2/3 depth).", default=None)

    def __post_init__(self) -> None:
        parts = self.split_weights
        if len(parts) != 5 or any(p < 0 for p in parts) or sum(parts) <= 0:
            raise ConfigError(
                f"split_fractions={self.split_fractions!r}: give 5 non-negative numbers av_sft,ar_sft,rl,val,test."
            )
        if self.positions_per_doc < 1:
            raise ConfigError("positions_per_doc must be >= 1.")
        if self.min_position >= self.max_doc_tokens:
            raise ConfigError(f"min_position={self.min_position} must be < max_doc_tokens={self.max_doc_tokens}.")
        if self.max_docs is not None and self.max_docs < 1:
            raise ConfigError(f"max_docs={self.max_docs}: give at least 1 document, or leave it unset for all of them.")

    @property
    def split_weights(self) -> list[float]:
        try:
            parts = [float(x) for x in str(self.split_fractions).split(",")]
        except ValueError:
            raise ConfigError(
                f"split_fractions={self.split_fractions!r}: not a comma-separated list of numbers."
            ) from None
        total = sum(parts) or 1.0
        return [p / total for p in parts]


@dataclass
class TeacherConfig:
    teacher: str = _help(
        "'local' (an HF causal LM), 'openai' (any OpenAI-compatible chat endpoint) or 'extractive' (model-free: the context's last characters quoted exactly + its topic word; the embedded configs' teacher).",
        default="local",
    )
    teacher_model: str = _help("Local model spec or the endpoint's model name. Default: the target model.", default="")
    teacher_base_url: str = _help(
        "Base URL of the OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.", default=""
    )
    teacher_api_key_env: str = _help(
        "Name of the environment variable holding the endpoint's API key (empty: no key is "
        "sent). Nothing is sent unless you name one, e.g. OPENAI_API_KEY.",
        default="",
    )
    teacher_max_new_tokens: int = _help("Token cap for one teacher answer.", default=64)
    teacher_temperature: float = _help("Teacher sampling temperature (0 = greedy).", default=0.0)
    teacher_batch_size: int = _help("Prompts per local generate call.", default=16)
    teacher_concurrency: int = _help("Parallel HTTP requests for the 'openai' teacher.", default=8)
    teacher_timeout_s: float = _help("Per-request timeout for the 'openai' teacher.", default=60.0)
    teacher_retries: int = _help("Retries with exponential backoff per request.", default=4)
    teacher_prefill: bool = _help(
        "'openai' teacher: send the opening tag as the start of the assistant's answer "
        "(`continue_final_message`, an extension vLLM's server and compatible ones accept; "
        "OpenAI's own API refuses it), so the model answers inside the format.",
        default=False,
    )
    teacher_malformed_warn: float = _help(
        "datagen warns when more than this share of teacher answers is malformed (their "
        "rows are dropped); a split whose every answer is malformed is an error.",
        default=0.2,
    )
    teacher_context_chars: int = _help(
        "The teacher sees at most this many characters of context before the position.", default=600
    )
    teacher_quote_chars: int = _help(
        "The extractive teacher quotes the context's last this many characters (fewer where "
        "the cut falls inside a word). On the embedded model 16 gave a far better AV+AR pair "
        "than 40 (docs/benchmarks.md).",
        default=16,
    )
    teacher_claims: str = _help(
        "What the extractive teacher says, in the order written: 'quote' (the exact ending, always "
        "there) and any of 'topic' (the context's most frequent long word) and 'next' (the model's own "
        "most likely next token there: datagen runs the whole model to record it), comma-separated "
        "('next,quote' writes the prediction before the quote). "
        "The topic is off by default: measured, the AV got it right at about chance and it "
        "lowered the pair.",
        default="quote",
    )

    def __post_init__(self) -> None:
        if self.teacher not in ("local", "openai", "extractive"):
            raise ConfigError(f"teacher={self.teacher!r}: use 'local', 'openai' or 'extractive'.")
        if not 0 <= self.teacher_malformed_warn <= 1:
            raise ConfigError(f"teacher_malformed_warn={self.teacher_malformed_warn}: a share of answers, in [0, 1].")
        if self.teacher_quote_chars < 1:
            raise ConfigError(f"teacher_quote_chars={self.teacher_quote_chars}: the quote needs at least 1 character.")
        _env_name(self, "teacher_api_key_env")
        try:  # the format itself says which claim lists it can write
            ExtractiveFormat(claim_types=tuple(self.teacher_claims.split(",")))
        except ValueError as err:
            raise ConfigError(f"teacher_claims={self.teacher_claims!r}: {err}") from None


def _env_name(section: Any, name: str) -> None:
    """An API key option holds the NAME of an environment variable; never echo its value: it is most
    likely a key pasted in place of a variable's name."""
    if getattr(section, name) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", getattr(section, name)):
        setattr(section, name, "")
        raise ConfigError(
            f"{name} must be the NAME of an environment variable (e.g. OPENAI_API_KEY), "
            "not the key itself; export the key and pass its variable's name."
        )


@dataclass
class JudgeConfig:
    judge: str = _help(
        "'none', or 'openai': `nla eval` asks an OpenAI-compatible chat endpoint to list each explanation's "
        "claims and mark each supported / contradicted / uncheckable against the context (free-form "
        "explanations have no rule that checks them). Off by default: nothing is sent anywhere unasked.",
        default="none",
    )
    judge_model: str = _help("The model name the judge's endpoint serves.", default="")
    judge_base_url: str = _help(
        "Base URL of the judge's OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.", default=""
    )
    judge_api_key_env: str = _help(
        "Name of the environment variable holding the judge endpoint's API key (empty: no key is sent).", default=""
    )
    judge_max_new_tokens: int = _help("Token cap for one judge answer.", default=256)
    judge_temperature: float = _help("Judge sampling temperature (0 = greedy).", default=0.0)
    judge_concurrency: int = _help("Parallel HTTP requests to the judge.", default=8)
    judge_timeout_s: float = _help("Per-request timeout for the judge.", default=60.0)
    judge_retries: int = _help("Retries with exponential backoff per judge request.", default=4)
    judge_prefill: bool = _help(
        "Send the verdicts' opening tag as the start of the judge's answer (`continue_final_message`, "
        "as --teacher_prefill).",
        default=False,
    )
    judge_context_chars: int = _help(
        "The judge reads at most this many characters of context before the position.", default=600
    )

    def __post_init__(self) -> None:
        if self.judge not in ("none", "openai"):
            raise ConfigError(f"judge={self.judge!r}: use 'none' or 'openai'.")
        _positive(self, "judge_max_new_tokens", "judge_concurrency", "judge_context_chars")
        _env_name(self, "judge_api_key_env")


@dataclass
class ARConfig:
    ar_lr: float = _help(
        "AR SFT learning rate (LoRA AR; measured on the embedded model: 1e-4 learns only the mean in 200 "
        "steps, 2e-3 learns the text. Full-size published configs set their own).",
        default=2e-3,
    )
    ar_steps: int = _help("AR SFT optimizer steps.", default=200)
    ar_batch_size: int = _help("AR SFT rows per micro-batch (per process).", default=16)
    ar_grad_accum: int = _help("Micro-batches per optimizer step.", default=1)
    ar_lora_r: int = _help("LoRA rank for the AR blocks (0 = full fine-tuning).", default=16)
    ar_eval_every: int = _help("Validate every N steps.", default=50)
    ar_val_rows: int = _help(
        "Val rows for that check, drawn across documents (each read four ways: its text and three controls).",
        default=256,
    )
    ar_save_every: int = _help("Checkpoint every N steps.", default=100)
    ar_shuffle_targets: bool = _help("Control run: train on targets permuted across rows.", default=False)
    ar_text: str = _help(
        "What the AR reads: 'explanation' (the NLA's AR), or 'context': the raw context's last characters "
        "instead (the context-oracle AR, the ceiling for `nla eval --oracle_ar`; saved under <output_dir>/ar_oracle).",
        default="explanation",
    )
    ar_oracle_steps: int = _help("Steps of the context-oracle AR that `nla demo` trains (0 = ar_steps).", default=0)
    mse_scale: float | None = _help(
        "Vectors are normalised to this norm before MSE (default sqrt(d_model)).", default=None
    )
    ar_checkpoint: str | None = _help("AR checkpoint to load (default: <output_dir>/ar/final).", default=None)
    ar_model: str | None = _help(
        "Train the AR of another model: model B of `nla datagen --paired_model B`, reading the same "
        "explanations and predicting B's activation (<data_dir>/paired/); saved under <output_dir>/ar_b "
        "(ar_oracle_b with --ar_text context).",
        default=None,
    )
    ar_layer: int | None = _help(
        "With --ar_model: the block of B the paired data holds (a check; default: what the data says).", default=None
    )

    def __post_init__(self) -> None:
        if self.ar_lr <= 0 or self.ar_steps < 0 or self.ar_batch_size < 1 or self.ar_oracle_steps < 0:
            raise ConfigError("ar_lr must be > 0, ar_steps >= 0, ar_oracle_steps >= 0, ar_batch_size >= 1.")
        _positive(self, "ar_eval_every", "ar_val_rows", "ar_save_every", "ar_grad_accum")
        if self.ar_text not in ("explanation", "context"):
            raise ConfigError(
                f"ar_text={self.ar_text!r}: use 'explanation' (the NLA's AR) or 'context' (the oracle AR)."
            )


@dataclass
class AVConfig:
    av_lr: float = _help("AV SFT learning rate.", default=2e-4)
    av_steps: int = _help("AV SFT optimizer steps.", default=200)
    av_batch_size: int = _help("AV SFT rows per micro-batch (per process).", default=8)
    av_grad_accum: int = _help("Micro-batches per optimizer step.", default=1)
    av_lora_r: int = _help("LoRA rank for the AV (0 = full fine-tuning).", default=16)
    av_eval_every: int = _help("Validate (real and shuffled vectors) every N steps.", default=50)
    av_val_rows: int = _help(
        "Val rows for that check, drawn across documents (each is read twice: real and shuffled vector).", default=64
    )
    av_eval_at_start: bool = _help(
        "Also run that check before the first step (the untrained AV's gap, the baseline).", default=True
    )
    av_save_every: int = _help("Checkpoint every N steps.", default=100)
    injection_scale: float | None = _help(
        "Norm the injected vector is rescaled to (default: the dataset's suggested p75 norm).", default=None
    )
    av_max_new_tokens: int = _help("Explanation length cap when generating.", default=64)
    av_checkpoint: str | None = _help("AV checkpoint to load (default: <output_dir>/av/final).", default=None)

    def __post_init__(self) -> None:
        if self.av_lr <= 0 or self.av_steps < 0 or self.av_batch_size < 1:
            raise ConfigError("av_lr must be > 0, av_steps >= 0, av_batch_size >= 1.")
        if self.injection_scale is not None and self.injection_scale <= 0:
            raise ConfigError("injection_scale must be > 0.")
        _positive(self, "av_eval_every", "av_val_rows", "av_save_every", "av_grad_accum", "av_max_new_tokens")


@dataclass
class RLConfig:
    rl_steps: int = _help("Joint RL steps.", default=50)
    rl_batch_size: int = _help("Activation vectors per RL step (per process).", default=4)
    rl_group_size: int = _help("GRPO samples per vector.", default=4)
    rl_av_lr: float = _help("AV learning rate during RL.", default=1e-5)
    rl_ar_lr: float = _help("AR learning rate during RL.", default=5e-5)
    rl_temperature: float = _help("Rollout sampling temperature.", default=1.0)
    rl_top_k: int = _help(
        "Rollouts sample from the k likeliest tokens (0: all); 50 is what transformers' generate used unasked.",
        default=TOP_K,
    )
    rl_kl_coef: float = _help("Weight of the k3 KL to the frozen SFT AV (0 skips reference log-probs).", default=0.01)
    rl_clip_eps: float = _help("PPO ratio clip.", default=0.2)
    rl_reward: str = _help("'neg_mse' (-MSE_nrm) or 'neg_log_mse'.", default="neg_mse")
    rl_contrastive_coef: float = _help(
        "Weight of the contrastive term (own vector vs others in batch) against template collapse.", default=0.0
    )
    rl_length_penalty: float = _help("Reward penalty per explanation token.", default=0.0)
    rl_claim_reward: float = _help(
        "Weight of the grounded claim term: the reward adds weight x the share of the explanation's "
        "claims its format's checks find true of the row's context. Off (0) by default: the "
        "paper's RL never sees the context; a run with it on says so in its checkpoints and "
        "eval report.",
        default=0.0,
    )
    rl_claim_quote_chars: int = _help(
        "With the grounded term, a true quote is paid its length over this many characters (at most 1) "
        "instead of in full, so saying more of the text, truthfully, pays more than the token alone "
        "(0: every true quote pays in full).",
        default=0,
    )
    rl_advantage_norm: str = _help(
        "Divide each group's centred rewards by the group's std ('group', GRPO) or by one std "
        "over the batch ('batch').",
        default="group",
    )
    rl_max_new_tokens: int = _help("Rollout length cap; hitting it gives the failure reward.", default=150)
    rl_save_every: int = _help("Checkpoint every N RL steps.", default=25)
    rl_shuffle_control: bool = _help(
        "Control run: the AV sees another row's vector while the AR must reconstruct the row's own.", default=False
    )
    rl_table_every: int = _help("Log a W&B table of samples every N steps.", default=10)
    rl_val_rows: int = _help(
        "Held-out (val split) vectors for rl/val_* (same sampling and reward as training, no update); "
        "measured before the first step and at the end. 0 turns it off.",
        default=32,
    )
    rl_val_every: int = _help("Also measure rl/val_* every N steps (0: only at the start and the end).", default=0)
    rl_rollout_engine: str = _help(
        "Who samples the rollouts: 'hf' (transformers generate + the injection hook, the reference) "
        "or 'vllm' (a vLLM engine in its own environment, `make vllm`; fed prompt embeddings, "
        "merged AV weights pushed after every update).",
        default="hf",
    )
    rl_vllm_python: str | None = _help(
        "The Python of the vLLM environment (default: $NLA_VLLM_PYTHON, else .venv-vllm/bin/python).", default=None
    )
    rl_vllm_memory_gb: float = _help(
        "The vLLM engine's KV cache in GiB (it shares the device with the trainer).", default=2.0
    )
    rl_micro_batch: int = _help(
        "Rollouts per forward and backward in the AV and AR updates (0: the whole step at once). The "
        "gradient is the same to float rounding; activation memory scales with it (`nla plan`).",
        default=0,
    )
    rl_engine_sync: str = _help(
        "How the vllm engine gets the AV's weights after each update: 'adapter' (only the AV's LoRA "
        "weights, sampled with a LoRA request), 'merged' (base + LoRA delta, every weight reloaded), or "
        "'auto' (adapter on CUDA, merged on CPU, where vLLM's LoRA kernels are slower; docs/benchmarks.md).",
        default="auto",
    )

    def __post_init__(self) -> None:
        if self.rl_rollout_engine not in ("hf", "vllm"):
            raise ConfigError(f"rl_rollout_engine={self.rl_rollout_engine!r}: use 'hf' or 'vllm'.")
        if self.rl_micro_batch < 0:
            raise ConfigError(f"rl_micro_batch={self.rl_micro_batch}: must be >= 0 (0: the whole step at once).")
        if self.rl_engine_sync not in SYNC_MODES:
            raise ConfigError(f"rl_engine_sync={self.rl_engine_sync!r}: use {', '.join(map(repr, SYNC_MODES))}.")
        if self.rl_reward not in ("neg_mse", "neg_log_mse"):
            raise ConfigError(f"rl_reward={self.rl_reward!r}: use 'neg_mse' or 'neg_log_mse'.")
        if self.rl_advantage_norm not in ("group", "batch"):
            raise ConfigError(f"rl_advantage_norm={self.rl_advantage_norm!r}: use 'group' or 'batch'.")
        if self.rl_claim_quote_chars < 0:
            raise ConfigError(f"rl_claim_quote_chars={self.rl_claim_quote_chars}: must be >= 0.")
        if self.rl_claim_reward < 0:
            raise ConfigError(f"rl_claim_reward={self.rl_claim_reward}: must be >= 0 (it pays for true claims).")
        if self.rl_group_size < 2:
            raise ConfigError("rl_group_size must be >= 2 (GRPO normalises rewards within a group).")
        if self.rl_temperature < 0 or self.rl_top_k < 0:
            raise ConfigError(
                f"rl_temperature={self.rl_temperature}, rl_top_k={self.rl_top_k}: both must be >= 0 (0 = greedy / all tokens)."
            )
        _positive(self, "rl_save_every", "rl_batch_size", "rl_max_new_tokens")


@dataclass
class EvalConfig:
    eval_max_rows: int = _help("Evaluate at most this many rows.", default=64)
    eval_batch_size: int = _help(
        "AV rows per generate call in eval (one call for 96 rows took 23 s on 2 CPU cores, "
        "three calls of 32 took 37 s).",
        default=64,
    )
    retrieval_candidates: int = _help("Candidates for top-1 retrieval (own vector + distractors).", default=16)
    independent_ar: str | None = _help("A second AR checkpoint for an independent score.", default=None)
    oracle_ar: str | None = _help(
        "A context-oracle AR (`nla train-ar --ar_text context`): eval reports its FVE on the rows' "
        "raw context as the ceiling, and the share of it the NLA reaches.",
        default=None,
    )
    reinjection_rows: int = _help(
        "Rows whose reconstruction is patched back into the target model at layer K (next-token KL "
        "vs the mean/shuffled/zero baselines); 0 = off. One forward of the context per row, then "
        "five runs of its last token.",
        default=32,
    )

    def __post_init__(self) -> None:
        if self.eval_max_rows < 2:
            raise ConfigError(
                f"eval_max_rows={self.eval_max_rows}: eval needs at least 2 rows (controls permute rows)."
            )
        if self.reinjection_rows < 0 or self.retrieval_candidates < 2 or self.eval_batch_size < 1:
            raise ConfigError("reinjection_rows must be >= 0, retrieval_candidates >= 2 and eval_batch_size >= 1.")


@dataclass
class LoggingConfig:
    report_to: str = _help("'wandb' or 'none'. Metrics always also go to <output_dir>/metrics.jsonl.", default="wandb")
    wandb_mode: str | None = _help(
        "online/offline/disabled. Default: $WANDB_MODE, else offline (online only when you ask).", default=None
    )
    wandb_tables: bool = _help(
        "Log sample tables (corpus text next to explanations) to W&B; always kept in tables.jsonl.", default=True
    )
    wandb_project: str = _help("W&B project.", default="nla")
    run_name: str | None = _help("W&B run name (default: output_dir's name + stage).", default=None)
    log_every: int = _help("Log metrics every N steps.", default=5)
    progress: bool = _help("Show progress bars.", default=True)

    def __post_init__(self) -> None:
        _positive(self, "log_every")
        if self.report_to not in ("wandb", "none"):
            raise ConfigError(f"report_to={self.report_to!r}: use 'wandb' or 'none'.")
        if self.wandb_mode not in (None, "online", "offline", "disabled"):
            raise ConfigError(f"wandb_mode={self.wandb_mode!r}: use online, offline or disabled.")


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "teacher": TeacherConfig,
    "ar": ARConfig,
    "av": AVConfig,
    "rl": RLConfig,
    "eval": EvalConfig,
    "judge": JudgeConfig,
    "logging": LoggingConfig,
}


@dataclass
class NLAConfig:
    """Everything one run needs; each stage reads the sections it uses."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    ar: ARConfig = field(default_factory=ARConfig)
    av: AVConfig = field(default_factory=AVConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)

    @property
    def data_dir(self) -> Path:
        return Path(self.data.data_dir) if self.data.data_dir else self.output_dir / "data"

    def to_flat_dict(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for name in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, name)))
        return flat

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def save(self, directory: str | Path, name: str = "config.yaml") -> Path:
        """Write the resolved config (flat, re-loadable with --config) atomically."""
        from nla.core.io import atomic_write_text

        path = Path(directory) / name
        atomic_write_text(path, yaml.safe_dump(self.to_flat_dict(), sort_keys=False))
        return path

    def replace(self, **flat_overrides: Any) -> NLAConfig:
        """A copy with some flat fields changed (validated again)."""
        return from_flat_dict({**self.to_flat_dict(), **flat_overrides})


def valid_keys() -> list[str]:
    return [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]


def check_keys(keys: Iterable[str], source: str, also_valid: Iterable[str] = ()) -> None:
    valid = valid_keys() + list(also_valid)
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Unknown config key {key!r} in {source}.{hint} Valid keys: {', '.join(sorted(valid))}")


def from_flat_dict(values: dict[str, Any]) -> NLAConfig:
    values = _current_keys(values, "config")
    check_keys(values, "config")
    sections = {}
    for name, cls in SECTIONS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        sections[name] = cls(**{k: v for k, v in values.items() if k in names})
    return NLAConfig(**sections)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} not found. Pass an existing YAML file to --config (see configs/).")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', None) or err}).") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; pass a YAML config file.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a YAML mapping of key: value.")
    data = _current_keys(data, str(path))
    check_keys(data, str(path))
    return data


def _bool_keys(extra: Iterable[type] = ()) -> set[str]:
    return {f.name for cls in [*SECTIONS.values(), *extra] for f in dataclasses.fields(cls) if f.type in (bool, "bool")}


def parse_config(argv: list[str] | None = None, extra: Iterable[type] = ()) -> tuple[NLAConfig, list[Any]]:
    """Parse `--config FILE` plus CLI overrides into an NLAConfig (and any stage-specific dataclasses)."""
    from trl import TrlParser

    argv = [_current_flag(a) for a in argv or []]
    from_yaml: dict[str, Any] = {}
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a file path.")
        from_yaml = load_yaml(argv[i + 1])  # names an unknown key, reads old names
        argv = argv[:i] + argv[i + 2 :]
    extra = list(extra)
    extra_keys = [f.name for cls in extra for f in dataclasses.fields(cls)]
    flags = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and a != "--help"]
    # `--no_X` is how `--help` shows turning off a boolean X that defaults to true: it is X too.
    booleans = _bool_keys(extra)
    flags = [f[3:] if f.startswith("no_") and f[3:] in booleans else f for f in flags]
    check_keys([f for f in flags if f not in extra_keys], "the command line", extra_keys)
    parser = TrlParser([*SECTIONS.values(), *extra])
    try:  # the YAML sets defaults, the command line overrides them
        parser.set_defaults_with_config(**from_yaml)
        parsed = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    n = len(SECTIONS)
    cfg = NLAConfig(**dict(zip(SECTIONS, parsed[:n])))
    return cfg, list(parsed[n:])
