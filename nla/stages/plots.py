"""The PNG plots: the eval report's controls chart, FVE by length and per-row histogram, and RL's
held-out curve. matplotlib's object API with the Agg canvas (no pyplot, no global backend switch),
so they render headless and never touch a caller's interactive figures; files are written atomically."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from nla.core.io import atomic_write_bytes
from nla.core.lookup import LOOKUPS


def bars(report: dict[str, Any]) -> list[tuple[str, float]]:
    """(label, fve) for the controls chart: the real score, then what it is compared against (the
    controls, the text-free lookups, the rewritten texts, the ceilings)."""
    out = [("real", report["fve_nrm"])]
    out += [(k, v["fve_nrm"]) for k, v in report["controls"].items()]
    out += [(k.replace("_", " "), v["fve_nrm"]) for k, v in (report.get("baselines") or {}).items() if k in LOOKUPS]
    para = report.get("paraphrase") or {}
    if para.get("fve_nrm") is not None:
        out.append(("paraphrase", para["fve_nrm"]))
    order = report.get("order_shuffled") or {}
    if order.get("fve_nrm") is not None:
        out.append(("phrases reordered", order["fve_nrm"]))
    if report.get("teacher_explanations"):
        out.append(("teacher text", report["teacher_explanations"]["fve_nrm"]))
    if report.get("independent_ar"):
        out.append(("independent AR", report["independent_ar"]["fve_nrm"]))
    if report.get("oracle"):
        out.append(("oracle AR, raw context", report["oracle"]["fve_nrm"]))
    return out


def _figure(width: float = 6.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return str(path)


def plot_controls(report: dict[str, Any], path: Path) -> str:
    items = bars(report)
    fig, ax = _figure(7.0, 3.8)
    values = [v if v is not None and math.isfinite(v) else 0.0 for _, v in items]
    n_lookups = sum(k in LOOKUPS for k in report.get("baselines") or {})  # text-free baselines: orange
    colors = ["tab:blue"] + ["tab:gray"] * len(report["controls"]) + ["tab:orange"] * n_lookups
    colors += ["tab:green"] * (len(items) - len(colors))
    ax.bar(range(len(items)), values, color=colors)
    ax.set_xticks(range(len(items)), [k for k, _ in items], rotation=30, ha="right")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("FVE (strict)")
    ax.set_title(f"Real explanations vs controls (n={report['n']})")
    return _save(fig, path)


def plot_lengths(report: dict[str, Any], path: Path) -> str:
    curve = report["fve_by_length"]
    points = [(int(k), v) for k, v in curve.items() if k != "full"]
    fig, ax = _figure()
    ax.plot([k for k, _ in points], [v for _, v in points], marker="o", label="cut to N tokens")
    ax.axhline(curve["full"], color="tab:blue", linestyle="--", label="full explanation")
    ax.set_xscale("log", base=2)
    ax.set_xticks([k for k, _ in points], [str(k) for k, _ in points])
    ax.set_xlabel("explanation tokens kept")
    ax.set_ylabel("FVE (strict)")
    ax.legend()
    ax.set_title("FVE by explanation length")
    return _save(fig, path)


def plot_histogram(rows: list[dict[str, Any]], path: Path) -> str:
    values = [r["fve_nrm"] for r in rows if r.get("fve_nrm") is not None and math.isfinite(r["fve_nrm"])]
    fig, ax = _figure()
    ax.hist(values, bins=min(30, max(5, len(values) // 3)), color="tab:blue")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("per-row FVE (1 − MSE/Var)")
    ax.set_ylabel("rows")
    ax.set_title("Per-row FVE")
    return _save(fig, path)


def rl_curve_points(metrics_jsonl: Path, stage: str = "rl") -> dict[str, list[tuple[int, float]]]:
    """(step, value) of each held-out RL series in a run's metrics.jsonl, last write per step wins
    (a resumed run logs its start again)."""
    keys = {"rl/val_fve_nrm": "live AR (co-trained)", "rl/val_fve_nrm_sft_ar": "SFT AR (never trained by RL)"}
    series: dict[str, dict[int, float]] = {label: {} for label in keys.values()}
    if Path(metrics_jsonl).is_file():
        for line in Path(metrics_jsonl).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("stage") != stage:
                continue
            for key, label in keys.items():
                if isinstance(row.get(key), (int, float)) and math.isfinite(row[key]):
                    series[label][int(row["step"])] = float(row[key])
    return {label: sorted(points.items()) for label, points in series.items() if points}


def plot_rl_curve(series: dict[str, list[tuple[int, float]]], path: Path) -> str:
    """Held-out strict FVE against RL steps (log-scaled steps: FVE grows roughly linearly in log steps)."""
    fig, ax = _figure()
    for label, points in series.items():
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=label)
    ax.set_xscale("symlog", linthresh=1.0)  # step 0 (before RL) stays on the axis
    ax.set_xlabel("RL step (log scale)")
    ax.set_ylabel("held-out FVE (strict, sampled as in training)")
    ax.set_title("Held-out FVE during joint RL")
    ax.legend()
    return _save(fig, path)
