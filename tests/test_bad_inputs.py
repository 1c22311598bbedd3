"""The bad-input catalogue: each case exits 2 with one line on stderr that names the fix, and leaves
no output that looks complete. Cases run in-process through `nla.cli.main` (the console script)."""

from __future__ import annotations

import json

import pytest
import torch

from nla.cli import main

SMOKE = "configs/smoke.yaml"


def _files(tmp):
    (tmp / "bad.yaml").write_text("ar_steps: [1\n")
    (tmp / "list.yaml").write_text("- a\n- b\n")
    (tmp / "binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    (tmp / "afile").write_text("x")
    (tmp / "empty.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    (tmp / "random.txt").write_bytes(bytes(range(256)) * 8)
    (tmp / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (tmp / "array.jsonl").write_text('["a list", "not an object"]\n')


# (name, stage and arguments ({tmp} and {model} are filled in), a fragment the one line must hold)
CASES = [
    ("yaml syntax", ["train-ar", "--config", "{tmp}/bad.yaml"], "not valid YAML"),
    ("yaml not a mapping", ["train-ar", "--config", "{tmp}/list.yaml"], "YAML mapping"),
    ("yaml not utf-8", ["train-ar", "--config", "{tmp}/binary.yaml"], "not UTF-8"),
    ("config missing", ["train-ar", "--config", "{tmp}/nope.yaml"], "not found"),
    ("unknown key", ["train-ar", "--config", SMOKE, "--ar_stpes", "3"], "ar_steps"),
    ("zero save interval", ["train-ar", "--config", SMOKE, "--ar_save_every", "0"], "ar_save_every"),
    ("zero eval interval", ["train-ar", "--config", SMOKE, "--ar_eval_every", "0"], "ar_eval_every"),
    ("negative layer", ["datagen", "--config", SMOKE, "--layer", "-1"], "layer"),
    ("bad dtype", ["datagen", "--config", SMOKE, "--dtype", "float64"], "dtype"),
    ("bad device", ["datagen", "--config", SMOKE, "--device", "tpu"], "device"),
    ("bad wandb mode", ["train-ar", "--config", SMOKE, "--wandb_mode", "loud"], "wandb_mode"),
    ("chat template missing", ["datagen", "--config", SMOKE, "--chat_template", "{tmp}/nope.jinja"], "chat_template"),
    (
        "resume path missing",
        [
            "train-ar",
            "--config",
            SMOKE,
            "--model",
            "{model}",
            "--output_dir",
            "{tmp}/r",
            "--data_dir",
            "{data}",
            "--resume",
            "{tmp}/nope",
        ],
        "not a complete checkpoint",
    ),
    (
        "hub id without allow_hub",
        ["datagen", "--config", SMOKE, "--model", "org/name", "--output_dir", "{tmp}/h"],
        "--allow_hub true",
    ),
    (
        "unknown embedded model",
        ["datagen", "--config", SMOKE, "--model", "embedded:nope", "--output_dir", "{tmp}/e"],
        "available",
    ),
    (
        "unknown builtin corpus",
        ["datagen", "--config", SMOKE, "--model", "{model}", "--corpus", "builtin:nope", "--output_dir", "{tmp}/c"],
        "builtin",
    ),
    (
        "corpus with no documents",
        [
            "datagen",
            "--config",
            SMOKE,
            "--model",
            "{model}",
            "--corpus",
            "{tmp}/empty.jsonl",
            "--output_dir",
            "{tmp}/d",
        ],
        "no documents",
    ),
    (
        "random bytes as a .txt corpus",
        ["datagen", "--config", SMOKE, "--model", "{model}", "--corpus", "{tmp}/random.txt", "--output_dir", "{tmp}/t"],
        "not UTF-8",
    ),
    (
        "non-UTF-8 jsonl line",
        [
            "datagen",
            "--config",
            SMOKE,
            "--model",
            "{model}",
            "--corpus",
            "{tmp}/latin1.jsonl",
            "--output_dir",
            "{tmp}/j",
        ],
        "not UTF-8",
    ),
    (
        "jsonl line not an object",
        [
            "datagen",
            "--config",
            SMOKE,
            "--model",
            "{model}",
            "--corpus",
            "{tmp}/array.jsonl",
            "--output_dir",
            "{tmp}/k",
        ],
        "one object per line",
    ),
    ("cuda without a GPU", ["train-ar", "--config", SMOKE, "--device", "cuda"], "no CUDA GPU"),
    (
        "layer out of range",
        ["datagen", "--config", SMOKE, "--model", "{model}", "--layer", "9", "--output_dir", "{tmp}/l"],
        "out of range",
    ),
    (
        "last block as layer",
        ["datagen", "--config", SMOKE, "--model", "{model}", "--layer", "3", "--output_dir", "{tmp}/l3"],
        "last block",
    ),
    (
        "output dir is a file",
        ["datagen", "--config", SMOKE, "--model", "{model}", "--output_dir", "{tmp}/afile"],
        "choose another --output_dir",
    ),
    (
        "train-ar without data",
        ["train-ar", "--config", SMOKE, "--model", "{model}", "--output_dir", "{tmp}/n"],
        "run `nla datagen`",
    ),
    (
        "train-av without data",
        ["train-av", "--config", SMOKE, "--model", "{model}", "--output_dir", "{tmp}/n"],
        "run `nla datagen`",
    ),
    (
        "rl without SFT",
        ["rl", "--config", SMOKE, "--model", "{model}", "--output_dir", "{tmp}/n", "--data_dir", "{data}"],
        "train-",
    ),
    (
        "train-ar on an empty split",
        ["train-ar", "--config", SMOKE, "--model", "{model}", "--output_dir", "{tmp}/n", "--data_dir", "{empty}"],
        "has no rows",
    ),
    (
        "rl on an empty split",
        [
            "rl",
            "--config",
            SMOKE,
            "--model",
            "{model}",
            "--output_dir",
            "{tmp}/n",
            "--data_dir",
            "{empty}",
            "--av_checkpoint",
            "{tmp}",
            "--ar_checkpoint",
            "{tmp}",
        ],
        "rows",
    ),
    ("max_docs zero", ["datagen", "--config", SMOKE, "--max_docs", "0"], "max_docs"),
    ("negative temperature", ["rl", "--config", SMOKE, "--rl_temperature", "-1"], "temperature"),
    (
        "negative verbalize temperature",
        ["verbalize", "--config", SMOKE, "--text", "x", "--verbalize_temperature", "-1"],
        "--verbalize_temperature -1",
    ),
    ("eval on one row", ["eval", "--config", SMOKE, "--eval_max_rows", "1"], "at least 2 rows"),
    (
        "split fractions miscounted",
        ["datagen", "--config", SMOKE, "--split_fractions", "1,2"],
        "5 non-negative numbers",
    ),
    ("unknown teacher", ["datagen", "--config", SMOKE, "--teacher", "nope"], "extractive"),
    (
        "hf corpus without allow_hub",
        ["datagen", "--config", SMOKE, "--model", "{model}", "--corpus", "hf:x:y", "--output_dir", "{tmp}/hf"],
        "--allow_hub true",
    ),
    ("group size 1", ["rl", "--config", SMOKE, "--rl_group_size", "1"], "group_size"),
    ("unknown rollout engine", ["rl", "--config", SMOKE, "--rl_rollout_engine", "sglang"], "'hf' or 'vllm'"),
    ("negative lr", ["train-ar", "--config", SMOKE, "--ar_lr", "-1"], "ar_lr"),
    ("verbalize without input", ["verbalize", "--config", SMOKE, "--checkpoint", "{tmp}"], "exactly one input"),
    (
        "verbalize with two inputs",
        ["verbalize", "--config", SMOKE, "--checkpoint", "{tmp}", "--text", "x", "--vectors", "{tmp}/v.npy"],
        "exactly one input",
    ),
    ("eval without checkpoint", ["eval", "--config", SMOKE, "--output_dir", "{tmp}/nowhere"], "--av_checkpoint DIR"),
    (
        "api key pasted as variable name",
        [
            "datagen",
            "--config",
            SMOKE,
            "--teacher",
            "openai",
            "--teacher_api_key_env",
            "sk-abcdefghijklmnopqrstuvwxyz0123456789",
        ],
        "variable",
    ),
    (
        "too few documents for a split",
        [
            "datagen",
            "--config",
            SMOKE,
            "--model",
            "{model}",
            "--max_docs",
            "2",
            "--teacher",
            "extractive",
            "--output_dir",
            "{tmp}/few",
        ],
        "got none of the 2 documents",
    ),
    (
        "a learning rate that diverges",
        [
            "train-ar",
            "--config",
            SMOKE,
            "--model",
            "{model}",
            "--output_dir",
            "{tmp}/div",
            "--data_dir",
            "{data}",
            "--ar_lr",
            "1e30",
            "--ar_steps",
            "40",
        ],
        "steps in a row had non-finite gradients",
    ),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("bad-inputs")
    assert (
        main(
            [
                "datagen",
                "--config",
                SMOKE,
                "--model",
                str(tiny_model_dir),
                "--output_dir",
                str(out),
                "--teacher",
                "extractive",
            ]
        )
        == 0
    )
    return out / "data"


@pytest.fixture(scope="module")
def empty_data_dir(tmp_path_factory, tiny_model_dir):
    """Split fractions that leave ar_sft, rl and test without rows: datagen itself succeeds."""
    out = tmp_path_factory.mktemp("empty-splits")
    assert (
        main(
            [
                "datagen",
                "--config",
                SMOKE,
                "--model",
                str(tiny_model_dir),
                "--output_dir",
                str(out),
                "--teacher",
                "extractive",
                "--split_fractions",
                "0.5,0,0,0.5,0",
            ]
        )
        == 0
    )
    return out / "data"


@pytest.mark.parametrize("name, args, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_with_the_fix(
    name, args, fragment, tmp_path, tiny_model_dir, data_dir, empty_data_dir, capsys
):
    if name == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    _files(tmp_path)
    filled = [a.format(tmp=tmp_path, model=tiny_model_dir, data=data_dir, empty=empty_data_dir) for a in args]
    rc = main(filled)
    err = capsys.readouterr().err.strip().splitlines()
    message = [line for line in err if line.startswith("nla ")]
    assert rc == 2 and len(message) == 1 and err[-1] == message[0], err[-5:]  # one line, nothing after it
    assert fragment in message[0] and "Traceback" not in "\n".join(err), message
    assert "sk-abcdefghijklmnop" not in message[0]  # a pasted key is never echoed
    for done in tmp_path.rglob("final"):  # nothing that looks complete was written
        raise AssertionError(f"{done} written by a failing run")


def test_an_unreachable_hub_is_one_line_naming_the_model(tmp_path):
    """--allow_hub with no hub to reach: transformers' two-line message (whose last line does not name
    the model) becomes one line with the model and the fix. A subprocess, since the hub library reads
    HF_HUB_OFFLINE when imported."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "WANDB_MODE": "disabled"}
    args = ["datagen", "--config", SMOKE, "--model", "nla-test/no-such-model", "--allow_hub", "true"]
    out = subprocess.run(
        [sys.executable, "-m", "nla", *args, "--output_dir", str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and err[-1].startswith("nla datagen: error:"), err[-5:]
    assert "'nla-test/no-such-model'" in err[-1] and "--model DIR" in err[-1], err[-1]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("damaged_file", ["value_head.safetensors", "adapter_model.safetensors"])
def test_a_damaged_checkpoint_file_is_named(damaged_file, tmp_path, tiny_model_dir, capsys):
    """A weights file cut off (a copy interrupted, a full disk elsewhere) is named with the fix."""
    from nla.core.sidecar import Meta, make_token_spec
    from nla.models.ar import build_ar, model_meta, save_ar
    from nla.testing import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    ar = build_ar(str(tiny_model_dir), 1, lora_r=4)
    data_meta = Meta(
        "nla_dataset", make_token_spec(tok, "㈠"), d_model=64, layer_index=1, base_model=str(tiny_model_dir)
    )
    folder = save_ar(ar, tmp_path / "ar", model_meta(ar, data_meta, str(tiny_model_dir), 8.0, {}), tok)
    path = folder / damaged_file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    from nla.models.ar import load_ar
    from nla.models.sources import ModelError

    with pytest.raises(ModelError, match=f"{damaged_file} cannot be read.*damaged"):
        load_ar(folder)


@pytest.mark.parametrize("limit_kb", [8, 60])
def test_a_write_that_fails_midway_is_one_line_and_leaves_no_checkpoint(limit_kb, tmp_path, tiny_model_dir, data_dir):
    """A real failed write, not a simulated one: the process may not grow a file past `limit_kb`
    (RLIMIT_FSIZE; writes then fail with EFBIG, as they fail with ENOSPC on a full disk). At 8 KB
    the adapter's safetensors write fails, at 60 KB torch's zip writer of the optimizer state
    ("unexpected pos"); either is one line naming the checkpoint, and no checkpoint or temp folder
    is left behind."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_kb * 1024, resource.RLIM_INFINITY))

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "nla.cli",
        "train-ar",
        "--config",
        SMOKE,
        "--model",
        str(tiny_model_dir),
        "--data_dir",
        str(data_dir),
        "--output_dir",
        str(out),
        "--ar_steps",
        "4",
        "--ar_save_every",
        "2",
        "--ar_lora_r",
        "4",
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"},
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("nla ")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    said = "File too large" if limit_kb == 8 else "a write did not complete"  # torch's writer gives no errno
    assert said in lines[0] and "checkpoint-000002" in lines[0] and "Traceback" not in proc.stderr, lines
    assert not list((out / "ar").glob("*checkpoint*")) and not (out / "ar" / "final").exists()
