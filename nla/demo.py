"""`nla demo`: the pipeline end to end on the embedded model within a small CPU budget.

    nla demo --config configs/embedded.yaml [--output_dir runs/demo]
    (multi-GPU: run the stages one by one with launch/local.sh; the demo is a single-process tour)

Each step below runs when its stage is built; the demo prints what it measured and writes
`<output_dir>/summary.json`.
"""

from __future__ import annotations

import json
import time

import torch

from nla.config import NLAConfig
from nla.io import atomic_write_text
from nla.models import load_model_and_tokenizer, resolve_model
from nla.stage import start_stage


def chat_reply(cfg: NLAConfig, prompt: str = "In one sentence, what is a neural network?") -> str:
    """A greedy chat reply from the target model: proof the real model loads and runs."""
    model, tok, _ = load_model_and_tokenizer(cfg.model, cfg.run.device)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True).to(model.device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str]) -> int:
    start = time.time()
    cfg, _ = start_stage(argv, "demo")
    t0 = time.time()
    path = resolve_model(cfg.model.model, cfg.model.cache_dir, cfg.model.allow_hub)
    print(f"[demo] model {cfg.model.model} -> {path} (resolved in {time.time() - t0:.1f}s)")
    prompt = "In one sentence, what is a neural network?"
    reply = chat_reply(cfg, prompt)
    print(f"[demo] user: {prompt}\n[demo] assistant (greedy): {reply}")
    summary = {"model": cfg.model.model, "model_path": path, "chat_reply": reply, "wall_s": round(time.time() - start, 1)}
    atomic_write_text(cfg.output_dir / "summary.json", json.dumps(summary, indent=2))
    print(f"[demo] wrote {cfg.output_dir / 'summary.json'}")
    return 0
