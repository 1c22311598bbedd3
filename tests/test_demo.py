"""`nla demo` end to end on a tiny model: every stage runs and summary.json has the promised shape."""

import json

from nla.cli import main


def test_demo_runs_the_whole_pipeline(tmp_path, tiny_model_dir, capsys):
    rc = main(["demo", "--config", "configs/smoke.yaml", "--model", str(tiny_model_dir), "--output_dir", str(tmp_path),
               "--teacher", "extractive", "--eval_max_rows", "8", "--rl_steps", "2", "--max_new_tokens", "8",
               "--max_response_tokens", "8"])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= {"sft", "rl", "checkpoint", "wall_s"}
    for report in (summary["sft"], summary["rl"]):
        assert {"fve_nrm", "controls", "top1_retrieval", "n"} <= set(report)
        assert {"shuffled_vector", "empty_text"} <= set(report["controls"])
    assert (tmp_path / "rl" / "final" / "av" / "nla_meta.yaml").is_file()
    assert (tmp_path / "rl" / "final" / "ar" / "value_head.safetensors").is_file()
    assert summary["checkpoint"].endswith("rl/final")
    out = capsys.readouterr().out
    assert "final checkpoint:" in out and "control: shuffled_vector" in out
