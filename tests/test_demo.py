"""`nla demo` end to end on a tiny model: every stage runs and summary.json has the promised shape."""

import json

from nla.cli import main


def test_demo_runs_the_whole_pipeline(tmp_path, tiny_model_dir, capsys):
    argv = [
        "demo",
        "--config",
        "configs/smoke.yaml",
        "--model",
        str(tiny_model_dir),
        "--output_dir",
        str(tmp_path),
        "--teacher",
        "extractive",
        "--eval_max_rows",
        "8",
        "--rl_steps",
        "2",
        "--av_max_new_tokens",
        "8",
        "--rl_max_new_tokens",
        "8",
        "--ar_oracle_steps",
        "3",
        "--ar_val_rows",
        "4",
    ]
    rc = main(argv)
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= {"sft", "rl", "checkpoint", "wall_s"}
    for report in (summary["sft"], summary["rl"]):
        assert {"fve_nrm", "controls", "top1_retrieval", "n"} <= set(report)
        assert {"shuffled_vector", "empty_text"} <= set(report["controls"])
    assert (tmp_path / "rl" / "final" / "av" / "nla_meta.yaml").is_file()
    assert (tmp_path / "rl" / "final" / "ar" / "value_head.safetensors").is_file()
    assert summary["checkpoint"].endswith("rl/final")
    # The RL AV is also scored by the SFT AR (not co-trained), and margins over the best control are reported.
    assert summary["rl"]["independent_ar"]["path"].endswith("ar/final") and summary["sft"]["independent_ar"] is None
    best = max(c["fve_nrm"] for c in summary["rl"]["controls"].values())
    assert abs(summary["control_margin"]["rl"] - (summary["rl"]["fve_nrm"] - best)) < 1e-9
    assert {"reward_mean", "fve_nrm"} <= set(summary["rl_training"]["val_start"]) & set(summary["rl_training"]["val"])
    # The ceilings: the context-oracle AR (trained in the demo, never the pair's AR) and the teacher's text.
    assert summary["ar_oracle"]["ar_text"] == "context" and "ar_oracle" in summary["ar_oracle"]["checkpoint"]
    # --ar_oracle_steps: the oracle's own budget
    assert (summary["ar_oracle"]["steps"], summary["ar_sft"]["steps"]) == (
        3,
        6,
    )
    assert summary["ar_oracle"]["val_rows"] == summary["ar_sft"]["val_rows"] == 4  # --ar_val_rows caps the AR's val
    for report in (summary["sft"], summary["rl"]):
        assert report["oracle"]["path"] == summary["ar_oracle"]["checkpoint"] and "fve_floor" in report
        assert report["teacher_explanations"]["n"] > 0
    for report in (summary["sft"], summary["rl"]):  # reinjection and the phrase-order control beside the FVE
        assert report["reinjection"]["n"] > 0 and "recovered" in report["reinjection"] and "order_shuffled" in report
        assert (tmp_path / ("eval_sft" if report is summary["sft"] else "eval_rl") / "report.html").is_file()
    assert "fve_nrm_sft_ar" in summary["rl_training"]["val"]  # the SFT AR reads the held-out rollouts too
    assert (tmp_path / "rl" / "held_out_fve_by_step.png").is_file()
    out = capsys.readouterr().out
    assert "final checkpoint:" in out and "control: shuffled_vector" in out and "SFT AR reading the AV" in out
    assert "ceiling: oracle AR, raw context" in out and "floor: best constant prediction" in out
    # Claims with their chance level, the token lookups and the margin over them, for SFT and RL.
    for report in (summary["sft"], summary["rl"]):
        quote = report["claims"]["types"]["quote"]
        assert report["claims"]["format"] == "extractive" and {"accuracy", "chance", "top_share"} <= set(quote)
        assert report["claims"]["teacher"]["types"]["quote"]["accuracy"] == 1.0  # the teacher's own quotes, checked
        assert report["baselines"]["token_lookup"]["fve_nrm"] is not None and "bigram_lookup" in report["baselines"]
    assert summary["lookup_margin"]["rl"] == summary["rl"]["fve_nrm"] - max(
        summary["rl"]["baselines"][k]["fve_nrm"] for k in ("token_lookup", "bigram_lookup")
    )
    assert "control: token_lookup" in out and "claims: quote true, chance" in out and "claims: format breaks" in out

    # A second run (every stage resumes) with the user's own oracle AR: the demo trains none.
    assert main(argv + ["--oracle_ar", summary["ar_oracle"]["checkpoint"]]) == 0
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again["ar_oracle"] is None and "train_ar_oracle" not in again["stage_seconds"]
    assert again["sft"]["oracle"]["path"] == summary["ar_oracle"]["checkpoint"]
