import subprocess
import sys

import pytest

from nla.cli import STAGES, main


def test_help_lists_every_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for stage in ["datagen", "train-ar", "train-av", "rl", "verbalize", "eval", "demo"]:
        assert stage in out and stage in STAGES


def test_unknown_stage_exits_nonzero(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown stage" in capsys.readouterr().err


def test_bad_config_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lerning_rate: 1\n")
    assert main(["demo", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nla demo: error: Unknown config key 'lerning_rate'")


@pytest.mark.parametrize("module", ["nla.cli", "nla"])
def test_console_script_runs(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "train-ar" in proc.stdout
