"""bench/run.py runs end to end on the tiny model: every key present, ratios positive and finite.

No timing assertions: the budget targets are checked (and reported) by the benchmark itself.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "run.py"
NUMBERS = [
    "injection_overhead_ratio",
    "extraction_tokens_per_s",
    "ar_samples_per_s",
    "av_sft_tokens_per_s",
    "rl_step_s",
    "rl_overhead_ratio",
    "peak_rss_mb",
    "generate_new_tokens_per_s",
    "rl_part_rollout_s",
    "rl_part_av_forward_backward_s",
    "rl_part_ar_forward_backward_s",
    "rl_part_av_ref_forward_s",
]


def _bench():
    spec = importlib.util.spec_from_file_location("nla_bench_run", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_tiny_model_keys_and_ratios(tiny_model_dir):
    bench = _bench()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = bench.run_all(str(tiny_model_dir), "float32", bench.Sizes.tiny(), log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    for key in NUMBERS:
        assert isinstance(result[key], float), key
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    assert isinstance(result["injection_overhead_met"], bool) and isinstance(result["rl_overhead_met"], bool)
    assert result["rl_overhead_met"] == (result["rl_overhead_ratio"] <= bench.TARGETS["rl_overhead_ratio"])
    assert result["dtype"] == "float32" and result["device"] in ("cpu", "cuda")
    assert result["layer"] == 1 and result["cpu_count"] >= 1 and result["torch"] == torch.__version__
    json.dumps(result)  # the last line of the CLI must be one JSON object
    assert "command" not in result  # added by main(), which also writes files; run_all writes none


def _probe_module():
    """bench/probe.py, a script outside the package, loaded as a module."""
    spec = importlib.util.spec_from_file_location("nla_bench_probe", BENCH.parent / "probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    return probe


def test_probe_reads_the_own_token_from_a_tiny_models_vectors(tiny_model_dir, tmp_path):
    """bench/probe.py end to end on a real datagen output (tiny model, 60 documents): every fact has
    its numbers; the position's own token, which the residual stream carries, is read above the
    majority label (the probe would fail this if it read nothing); knowing the own token a second
    time adds nothing to the token reader's FVE (6 test rows here: the FVEs themselves mean little)."""
    from nla.cli import main as nla_main

    out = tmp_path / "run"
    args = ["datagen", "--config", "configs/smoke.yaml", "--model", str(tiny_model_dir), "--output_dir", str(out)]
    assert nla_main([*args, "--teacher", "extractive", "--teacher_claims", "quote,next", "--max_docs", "60"]) == 0
    probe = _probe_module()
    results = probe.measure(out / "data", [1, 2], epochs=100, seed=0)
    rules = {"starts a word", "position / 32", *probe.CONTEXT_RULES}
    assert set(results) == {"token", "token -1", "model's next token", *rules}
    for r in results.values():
        assert all(0.0 <= r[k] <= 1.0 for k in ("probe", "majority", "from_own_token", "seen_in_train"))
        assert all(math.isfinite(r[k]) for k in ("fve_token", "fve_with_truth", "fve_with_probe"))
    token = results["token"]
    assert token["probe"] > token["majority"] + 0.1, token
    assert abs(token["fve_with_truth"] - token["fve_token"]) < 0.01, token


def test_probe_context_rules_on_constructed_contexts():
    """Each rule on contexts built to have one answer, and its other answer."""
    probe = _probe_module()
    assert probe.kind_of_line("Some prose.\n    x = f(y") == "code"
    assert probe.kind_of_line("Intro\n>>> print(") == "code"
    assert probe.kind_of_line("Items:\n- the first") == "list item"
    assert probe.kind_of_line("    indented once\nback to prose") == "prose"
    assert probe.in_brackets("call f(a, b") == "inside"
    assert probe.in_brackets("call f(a, b) and") == "outside"
    assert probe.in_brackets("(old)\n\nnew paragraph [") == "inside"
    assert probe.in_quotes("use `len") == "inside"
    assert probe.in_quotes('say "hi" then') == "outside"
    assert probe.words_into_sentence("Done. The") == "0-1"
    assert probe.words_into_sentence("Done. The cat sat on the mat") == "5-9"
    assert probe.chars_into_line("a\nabc") == "<8"
    assert probe.chars_into_line("x" * 40) == "32-63"


def test_probe_reads_a_planted_label_linear_and_hidden():
    """fit_probe on vectors whose label is planted in one direction: both readers find it on fresh
    rows, and shuffled labels at about chance (a probe that read nothing would fail the first; one
    scored on the rows it was fit on, the second)."""
    probe = _probe_module()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g)
    labels = ["a" if v > 0 else "b" for v in x[:, 3].tolist()]
    shuffled = [labels[i] for i in torch.randperm(600, generator=g).tolist()]
    for hidden in (0, 32):
        read = probe.fit_probe(x[:400], labels[:400], epochs=500, seed=0, hidden=hidden)(x[400:])
        assert sum(p == t for p, t in zip(read, labels[400:])) / 200 > 0.75, hidden
        read = probe.fit_probe(x[:400], shuffled[:400], epochs=500, seed=0, hidden=hidden)(x[400:])
        assert sum(p == t for p, t in zip(read, shuffled[400:])) / 200 < 0.65, hidden
