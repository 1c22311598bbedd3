"""The vLLM side of the `vllm` rollout engine: a small server run by the engine's own Python.

vLLM pins older transformers than this package needs, so it lives in its own environment
(`make vllm` builds `.venv-vllm`) and this file runs there as a child process of the trainer. It
imports nothing from `nla`: only the standard library, torch, safetensors and vllm.

Protocol: one JSON object per line on stdin, one JSON reply per line on the original stdout
(vLLM's own logging goes to stderr). Tensors travel as safetensors files in a folder both sides
can read. Requests:

  {"op": "start", "model": DIR, "dtype": "float32", "max_model_len": N, "seed": S, "memory_gb": G,
   "lora_rank": R, "cpus": [ids] or null}  (R > 0: LoRA requests up to rank R are served; 0: none;
   cpus: run on those cores, one thread each, as one of several engines sharing a CPU machine)
  {"op": "generate", "embeds": FILE, "n": G, "temperature": T, "max_tokens": M, "stop": [ids], "seed": S,
   "top_k": K}  (K 0: every token; the trainer sends its own, 50 by default, as transformers' generate uses)
      FILE holds `embeds` [rows, t, d]: every prompt row as input embeddings (marker row = the
      vector). Reply: {"token_ids": [[...]] (rows * n, sample j of row i at i * n + j),
                       "logprobs": [[...]] (the engine's log-prob of each sampled token)}
  {"op": "load", "weights": FILE, "reset_cache": true}
      Reload every weight from FILE (a full safetensors state dict in checkpoint names), then
      clear the prefix cache: a cached prompt's keys and values were computed with the old
      weights, and vLLM would otherwise reuse them. `reset_cache: false` exists for the test that
      shows why. Reply: {"seconds": s}
  {"op": "adapter", "path": DIR, "reset_cache": true}
      Sample every later request with the LoRA adapter in DIR (peft's adapter_config.json and
      adapter_model.safetensors) instead of the one before, which is dropped; the base weights stay.
      Each adapter gets a new id, so nothing cached under the old one is reused; the prefix cache is
      cleared as after "load". Reply: {"seconds": s}
  {"op": "stop"}
Every reply has "ok"; a failure replies {"ok": false, "error": "..."} and the worker keeps serving.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def serve() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything vLLM prints goes to stderr; stdout carries only replies
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: collective_rpc runs here
    state: dict = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.pop("op")
            if op == "stop":
                out.write(json.dumps({"ok": True}) + "\n")
                break
            reply = {"start": start, "generate": generate, "load": load, "adapter": adapter}[op](state, **req)
            out.write(json.dumps({"ok": True, **reply}) + "\n")
        except Exception as err:  # reported to the trainer, which raises it with this text
            traceback.print_exc(file=sys.stderr)
            out.write(json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"}) + "\n")


def start(
    state: dict,
    model: str,
    dtype: str,
    max_model_len: int,
    seed: int,
    memory_gb: float,
    lora_rank: int = 0,
    cpus: list[int] | None = None,
) -> dict:
    began = time.time()
    if cpus:  # before vLLM starts: its CPU backend refuses thread changes once running
        import torch

        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(len(cpus))
    if hasattr(os, "sched_getaffinity"):  # in the worker's log, for whoever checks the split
        print(f"nla vllm worker: cores {sorted(os.sched_getaffinity(0))}", file=sys.stderr, flush=True)
    from vllm import LLM

    lora = {"enable_lora": True, "max_lora_rank": lora_rank, "max_loras": 1} if lora_rank else {}
    share = gpu_share()
    # Blocks of 32 tokens (the smallest the CPU backend takes; its default is 128): only whole blocks
    # are prefix-cached, and the AV prompt before the marker, the same for every row, is short.
    # the trainer shares the device: a fixed KV cache
    state["llm"] = LLM(
        model=model,
        dtype=dtype,
        enable_prompt_embeds=True,
        max_model_len=max_model_len,
        seed=seed,
        enforce_eager=True,
        enable_prefix_caching=True,
        block_size=32,
        kv_cache_memory_bytes=int(memory_gb * 2**30),
        **share,
        **lora,
    )
    state["lora"] = None
    return {"seconds": time.time() - began, "version": __import__("vllm").__version__}


def gpu_share() -> dict:
    """On a GPU the trainer got there first: vLLM refuses to start unless the free memory covers its
    gpu_memory_utilization (0.9 of the card by default, even with an explicit KV cache size), so ask
    for what is free now, less a margin. Nothing on CPU, where that check does not apply."""
    import torch

    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    share = max(0.02, min(0.9, free / total - 0.02))
    print(
        f"nla vllm worker: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free, gpu_memory_utilization {share:.3f}",
        file=sys.stderr,
        flush=True,
    )
    return {"gpu_memory_utilization": share}


def generate(
    state: dict, embeds: str, n: int, temperature: float, max_tokens: int, stop: list[int], seed: int, top_k: int = 0
) -> dict:
    from safetensors.torch import load_file
    from vllm import SamplingParams

    rows = load_file(embeds)["embeds"]
    greedy = temperature <= 0
    params = SamplingParams(
        n=1 if greedy else n,
        temperature=0.0 if greedy else temperature,
        top_k=0 if greedy else top_k,
        max_tokens=max_tokens,
        stop_token_ids=stop,
        logprobs=0,
        seed=None if greedy else seed,
        skip_special_tokens=False,
    )
    outputs = state["llm"].generate(
        [{"prompt_embeds": r} for r in rows], params, use_tqdm=False, lora_request=state["lora"]
    )
    token_ids, logprobs = [], []
    for o in outputs:
        samples = o.outputs * n if greedy else sorted(o.outputs, key=lambda c: c.index)
        for c in samples:
            token_ids.append(list(c.token_ids))
            logprobs.append([float(lp[t].logprob) for t, lp in zip(c.token_ids, c.logprobs)])
    return {"token_ids": token_ids, "logprobs": logprobs}


def load(state: dict, weights: str, reset_cache: bool = True) -> dict:
    from safetensors.torch import load_file

    began = time.time()
    llm = state["llm"]
    tensors = load_file(weights)
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(tensors.items())})
    if reset_cache:
        llm.reset_prefix_cache()
    return {"seconds": time.time() - began}


def adapter(state: dict, path: str, reset_cache: bool = True) -> dict:
    from vllm.lora.request import LoRARequest

    began = time.time()
    engine, old = state["llm"].llm_engine, state["lora"]
    new_id = old.lora_int_id + 1 if old else 1
    request = LoRARequest(f"av-{new_id}", new_id, path)
    if old is not None:
        engine.remove_lora(old.lora_int_id)
    if not engine.add_lora(request):
        raise RuntimeError(f"vLLM did not load the adapter in {path}")
    state["lora"] = request
    if reset_cache:
        state["llm"].reset_prefix_cache()
    return {"seconds": time.time() - began}


if __name__ == "__main__":
    serve()
