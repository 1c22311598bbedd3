"""`nla eval`'s outputs: report.json, report.md, report.html, rows.jsonl and the plots of
`nla.stages.plots`. Every file is written atomically. `format_table` is the short summary `nla eval`
prints."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from nla.core import claims
from nla.core.io import atomic_write_text
from nla.core.lookup import LOOKUPS
from nla.core.rewards import describe_reward
from nla.stages.faithfulness import best_lookup, control_margin, lookup_margin
from nla.stages.plots import plot_controls, plot_histogram, plot_lengths

CONTROL_NOTES = {
    "shuffled_vector": "AV sees another row's vector",
    "zero_vector": "AV sees a zero vector",
    "mean_vector": "AV sees the mean vector",
    "empty_text": "AR reads an empty explanation",
    "random_text": "AR reads another row's explanation",
}
MARGIN = 0.05  # a real NLA should beat every control by more than this (in FVE)
LOOKUP_NOTES = {"token_lookup": "the position's last token", "bigram_lookup": "the last two tokens"}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def flags(report: dict[str, Any]) -> list[str]:
    """Plain-language warnings for the failure modes others have hit (design note 11)."""
    real, out = report["fve_nrm"], []
    best_name, best = max(((k, v["fve_nrm"]) for k, v in report["controls"].items()), key=lambda kv: kv[1])
    if report["non_latin_rate"] > 0.1:
        out.append(f"{report['non_latin_rate']:.0%} of responses contain non-Latin letters: check the injection.")
    if report["extraction_fail_rate"] == 1.0:  # every row read "": the comparisons below say nothing more
        return out + [
            "every explanation failed (no closing tag, or the length cap): an untrained AV, or raise max_new_tokens."
        ]
    if best > real:
        out.append(
            f"control '{best_name}' scores {best:.3f}, above the real {real:.3f}: the explanations carry "
            "less about their own vector than the control does."
        )
    elif best >= real - MARGIN:
        out.append(
            f"control '{best_name}' scores {best:.3f}, within {MARGIN} of the real {real:.3f}: "
            "the explanations carry little vector-specific information."
        )
    teacher = (report.get("teacher_explanations") or {}).get("fve_nrm")
    empty = report["controls"]["empty_text"]["fve_nrm"]
    if report["extraction_fail_rate"] < 0.5 and empty >= real - MARGIN:
        # the teacher-text row tells whose problem it is: an AR that reads the teacher's text well
        # is not content-blind, so the AV's explanations are what carries too little
        if teacher is not None and teacher > empty + MARGIN:
            out.append(
                f"empty text scores about as well as the AV's explanations, but the AR reads the teacher's text at "
                f"{teacher:.3f}: the AR uses text; the AV's explanations carry too little."
            )
        else:
            out.append(
                "empty text scores about as well as the explanations, and the AR gains nothing from the teacher's "
                "text either: the AR may be content-blind."
            )
    lookup = best_lookup(report)
    if lookup is not None and lookup[1] >= real:
        out.append(
            f"a lookup table of the position's last tokens ({lookup[0]}, no text) scores {lookup[1]:.3f}, at or above "
            f"the real {real:.3f}: the explanations carry less than the token itself."
        )
    out += claim_warnings(report.get("claims") or {})
    if report["top1_retrieval"] <= 1.5 * report["top1_chance"]:
        out.append(
            f"top-1 retrieval {report['top1_retrieval']:.3f} is near chance {report['top1_chance']:.3f}: "
            "possible template collapse (one description for every vector)."
        )
    if report["extraction_fail_rate"] > 0.2:
        out.append(f"{report['extraction_fail_rate']:.0%} of explanations failed (no closing tag or length cap).")
    return out


def claim_warnings(c: dict[str, Any]) -> list[str]:
    """Claims no more often true than chance, and the collapse signals (`claims.collapse_warnings`)."""
    if not c:
        return []
    out = []
    for kind, t in c["types"].items():
        if (
            t.get("accuracy") is not None
            and t.get("chance") is not None
            and t["n"] >= 5
            and t["accuracy"] <= t["chance"] + MARGIN
        ):
            out.append(
                f"{kind} claims are true in {t['accuracy']:.0%}, against {t['chance']:.0%} when checked against another "
                "row's context: no better than chance."
            )
    return out + claims.collapse_warnings(c, c.get("teacher"))


def markdown(report: dict[str, Any], rows: list[dict[str, Any]], n_samples: int = 8) -> str:
    """report.md: headline, controls, ceilings, the optional controls, length curve, independent AR,
    flags, plots, sample rows (one section function each)."""
    sections = [
        _md_headline(report),
        _md_controls(report),
        _md_claims(report),
        _md_ceilings(report),
        _md_paraphrase(report),
        _md_reinjection(report),
        _md_order(report),
        _md_length(report),
        _md_independent(report),
        _md_flags_and_plots(report),
        _md_samples(rows, n_samples),
    ]
    return "\n".join(line for section in sections for line in section) + "\n"


def _reward_line(reward: dict[str, Any] | None) -> list[str]:
    """What the AV's RL was rewarded for (an RL checkpoint records it; SFT ones have none)."""
    text = describe_reward(reward)
    return [f"- RL reward: {text}"] if text else []


def _md_headline(r: dict[str, Any]) -> list[str]:
    lines = [
        "# NLA evaluation\n",
        f"- data: `{r['source']}` ({r['n']} rows); AV `{r['checkpoint']['av']}`, AR `{r['checkpoint']['ar']}`",
        f"- FVE is **{r['fve_definition']}**; Var = {_fmt(r['var'], 4)} from {r['var_source']}; "
        f"vectors normalised to {_fmt(r['mse_scale'], 2)}",
        f"- explanations: {r['selection']} (temperature {r['temperature']})",
        *_reward_line(r.get("rl_reward")),
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in (
        "fve_nrm",
        "fve_floor",
        "fve_centered",
        "fve_vs_mean_pred",
        "cos_mean",
        "top1_retrieval",
        "top1_chance",
        "explanation_tokens_mean",
        "extraction_fail_rate",
        "non_latin_rate",
    ):
        label = key + {
            "fve_vs_mean_pred": " (lenient: vs predicting the mean)",
            "fve_floor": " (strict FVE of the best constant prediction)",
        }.get(key, "")
        lines.append(f"| {label} | {_fmt(r[key])} |")
    return lines


def _md_controls(r: dict[str, Any]) -> list[str]:
    lines = [
        "\n## Controls\n",
        "| control | what it does | fve_nrm | top-1 |",
        "|---|---|---|---|",
        f"| real | the AV's explanation of the row's own vector | {_fmt(r['fve_nrm'])} | {_fmt(r['top1_retrieval'])} |",
    ]
    for k, v in r["controls"].items():
        lines.append(f"| {k} | {CONTROL_NOTES.get(k, '')} | {_fmt(v['fve_nrm'])} | {_fmt(v.get('top1_retrieval'))} |")
    lines.append(
        f"| floor | one constant prediction (the mean direction) for every row | {_fmt(r.get('fve_floor'))} | |"
    )
    base = r.get("baselines") or {}
    if "skipped" in base:
        lines.append(
            f"\nText-free baselines (a lookup of the position's last tokens): not computed: {base['skipped']}."
        )
    elif base:
        lines += [
            "\nText-free baselines: no model and no text, the mean training vector of the "
            f"{base['train_rows']} training rows ({', '.join(base['splits'])}) that end in the same tokens, "
            "backing off to fewer tokens, then to the overall mean.\n",
            "| baseline | what it knows | fve_nrm | top-1 | rows matched at full length |",
            "|---|---|---|---|---|",
        ]
        for k in LOOKUPS:
            lines.append(
                f"| {k} | {LOOKUP_NOTES[k]} | {_fmt(base[k]['fve_nrm'])} | {_fmt(base[k]['top1_retrieval'])} | "
                f"{_fmt(base[k]['matched'])} |"
            )
        lines.append(
            f"\nThe NLA's margin over the stronger lookup: **{_fmt(r.get('lookup_margin'))}** "
            f"(over the best of the five controls above: {_fmt(control_margin(r))})."
        )
    return lines


def _md_claims(r: dict[str, Any]) -> list[str]:
    c = r.get("claims")
    if not c:
        return []
    teacher = c.get("teacher") or {}
    lines = [
        "\n## Claims\n",
        f"Format `{c['format']}`; {c['n_explained']} of {c['n']} explanations, {c['n_claims']} claims. "
        "Each claim is checked against the row's context; *chance* is the same check against another row's context.\n",
        "| claim | check | true | chance | teacher's text |",
        "|---|---|---|---|---|",
    ]
    for kind, t in c["types"].items():
        if not t["checked"]:
            lines.append(f"| {kind} | unchecked (no rule; `--judge openai` reads them) | – | – | – |")
            continue
        for name, v in (t.get("checks") or {}).items():
            ref = (((teacher.get("types") or {}).get(kind) or {}).get("checks") or {}).get(name, {}).get("accuracy")
            lines.append(f"| {kind} | {name} | {_fmt(v['accuracy'])} | {_fmt(v['chance'])} | {_fmt(ref)} |")
    judged = c.get("judged")
    if judged:
        lines.append(f"| any (LLM judge) | supported | {_fmt(judged['accuracy'])} | {_fmt(judged['chance'])} | – |")
        lines.append(
            f"\nJudge `{judged['judge']}`: {judged['n_claims']} claims, contradicted {_fmt(judged['contradicted'])} "
            f"(chance {_fmt(judged['chance_contradicted'])}), uncheckable {_fmt(judged['uncheckable'])}; "
            f"{judged['malformed_answers']} malformed answers."
        )
    lines += [
        "\nCollapse signals (the teacher's own text on the same rows alongside):\n",
        "| claim | present | distinct values | most common (share) | teacher: distinct, share |",
        "|---|---|---|---|---|",
    ]
    for kind, t in c["types"].items():
        ref = (teacher.get("types") or {}).get(kind) or {}
        top = f"`{t['top_value']}` ({_fmt(t['top_share'])})" if t["top_value"] is not None else "–"
        lines.append(
            f"| {kind} | {_fmt(t['present'])} | {t['distinct']} | {top} | {ref.get('distinct', '–')}, "
            f"{_fmt(ref.get('top_share'))} |"
        )
    lines.append(
        f"\nFormat breaks {_fmt(c['format_break_rate'])} of explanations; malformed claims {_fmt(c['malformed_rate'])}; "
        f"explanations repeated word for word {_fmt(c['repeated_verbatim'])}."
    )
    return lines


def _md_ceilings(r: dict[str, Any]) -> list[str]:
    lines = ["\n## Ceilings\n", "| reader | what it reads | fve_nrm |", "|---|---|---|"]
    if r.get("teacher_explanations"):
        teacher = r["teacher_explanations"]["fve_nrm"]
        lines.append(f"| this AR | the dataset's teacher explanations | {_fmt(teacher)} |")
    if r.get("oracle"):
        lines.append(
            f"| oracle AR `{r['oracle']['path']}` | the raw context (last characters) | {_fmt(r['oracle']['fve_nrm'])} |"
        )
        lines.append(
            f"| | share of the way from the floor to the oracle the NLA reaches | {_fmt(r.get('fraction_of_oracle'))} |"
        )
    if not (r.get("teacher_explanations") or r.get("oracle")):
        lines.append("| – | no teacher text in the data and no --oracle_ar given | – |")
    return lines


def _md_paraphrase(r: dict[str, Any]) -> list[str]:
    para = r.get("paraphrase")
    if not para:
        return []
    return [
        "\n## Paraphrase control\n",
        f"Method: {para['method']}. Rows: {para['n']} "
        f"(teacher failed on {_fmt(para['fail_rate'])}). FVE original {_fmt(para['fve_original'])} → "
        f"paraphrased {_fmt(para['fve_nrm'])}; retained {_fmt(para['fve_retained'])}.",
    ]


def _md_reinjection(r: dict[str, Any]) -> list[str]:
    re_ = r.get("reinjection") or {}
    if re_.get("kl") is None:
        return []
    return [
        "\n## Reinjection\n",
        f"The reconstruction (rescaled to the activation's norm) patched into the target "
        f"model at layer K, last position, on {re_['n']} rows ({re_['left_out']} left out: the context did not "
        "tokenize back to the stored activation). Next-token KL(original ‖ patched), lower is better:\n",
        "| patch | KL | top-1 agrees |",
        "|---|---|---|",
        f"| reconstruction | {_fmt(re_['kl'])} | {_fmt(re_['top1_agree'])} |",
        f"| mean activation | {_fmt(re_['kl_mean_baseline'])} | {_fmt(re_['top1_agree_mean_baseline'])} |",
        f"| another row's activation | {_fmt(re_['kl_shuffled_baseline'])} | – |",
        f"| zero | {_fmt(re_['kl_zero_baseline'])} | – |",
        f"\nrecovered = 1 − KL_reconstruction / KL_mean = {_fmt(re_['recovered'])}.",
    ]


def _md_order(r: dict[str, Any]) -> list[str]:
    order = r.get("order_shuffled")
    if not (order and order.get("fve_nrm") is not None):
        return []
    return [
        "\n## Order-shuffle control\n",
        f"Each explanation's phrases in another order (seeded), on the "
        f"{order['n']} rows with two or more phrases: FVE original {_fmt(order['fve_original'])} → reordered "
        f"{_fmt(order['fve_nrm'])}; retained {_fmt(order['fve_retained'])}. "
        f"Example: `{order['example'][0]}` → `{order['example'][1]}`.",
    ]


def _md_length(r: dict[str, Any]) -> list[str]:
    by_length = r["fve_by_length"]
    return [
        "\n## FVE by explanation length\n",
        "| tokens | " + " | ".join(by_length) + " |",
        "|---" * (len(by_length) + 1) + "|",
        "| fve_nrm | " + " | ".join(_fmt(v) for v in by_length.values()) + " |",
    ]


def _md_independent(r: dict[str, Any]) -> list[str]:
    ind = r.get("independent_ar")
    if not ind:
        return []
    return [
        "\n## Independent AR\n",
        f"`{ind['path']}`: fve_nrm {_fmt(ind['fve_nrm'])} (Var {_fmt(ind['var'], 4)} from "
        f"{ind['var_source']}); its empty-text control {_fmt(ind['empty_text_fve_nrm'])}.",
    ]


def _md_flags_and_plots(r: dict[str, Any]) -> list[str]:
    warned = flags(r)
    files = (r.get("files") or {}).items()
    plots = [f"![{name}]({Path(p).name})" for name, p in files if p.endswith(".png")]
    return (
        ["\n## Flags\n"]
        + ([f"- ⚠ {w}" for w in warned] or ["- none: the real score clears every control."])
        + ["\n## Plots\n"]
        + plots
    )


def _md_samples(rows: list[dict[str, Any]], n_samples: int) -> list[str]:
    lines = ["\n## Sample rows\n", "| context (tail) | explanation | fve |", "|---|---|---|"]
    for row in rows[:n_samples]:
        ctx = (row.get("context") or "")[-80:].replace("|", "\\|").replace("\n", " ")
        expl = (row["explanation"] or "<failed>").replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| …{ctx} | {expl} | {_fmt(row['fve_nrm'])} |")
    return lines


def write_report(report: dict[str, Any], rows: list[dict[str, Any]], out_dir: str | Path) -> dict[str, str]:
    """Write plots, rows.jsonl, report.md and report.json (last) into `out_dir`; return their paths."""
    out = Path(out_dir)
    files = {
        "controls_png": plot_controls(report, out / "controls.png"),
        "fve_by_length_png": plot_lengths(report, out / "fve_by_length.png"),
        "fve_hist_png": plot_histogram(rows, out / "fve_hist.png"),
    }
    files["rows"] = str(
        atomic_write_text(out / "rows.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))
    )
    files["report_md"] = str(out / "report.md")
    files["report_html"] = str(out / "report.html")
    files["report_json"] = str(out / "report.json")
    report["files"] = files
    atomic_write_text(out / "report.md", markdown(report, rows))
    plots = {k: files[k] for k in ("controls_png", "fve_by_length_png", "fve_hist_png") if files.get(k)}
    atomic_write_text(out / "report.html", html_page(f"NLA eval: {report.get('source', '')}", rows, report, plots))
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False, default=str))
    return files


def headline_pairs(report: dict[str, Any]) -> list[tuple[str, Any]]:
    """(metric, value) of the headline: the terminal table and report.html show the same list."""
    r = report
    head = [
        ("fve_nrm (strict)", r["fve_nrm"]),
        ("fve_floor (best constant)", r.get("fve_floor")),
        ("fve_centered", r["fve_centered"]),
        ("cos_mean", r["cos_mean"]),
        (f"top1_retrieval (chance {r['top1_chance']:.3f})", r["top1_retrieval"]),
        ("explanation_tokens_mean", r["explanation_tokens_mean"]),
        ("extraction_fail_rate", r["extraction_fail_rate"]),
        ("non_latin_rate", r["non_latin_rate"]),
    ]
    best = best_lookup(r)
    if best is not None:
        head += [(f"text-free: {best[0]} fve_nrm", best[1]), ("fve_nrm minus the lookup", lookup_margin(r))]
    c = r.get("claims") or {}
    if c:
        head += [
            (f"claims: {kind} true (chance)", f"{_fmt(t['accuracy'])} ({_fmt(t['chance'])})")
            for kind, t in c["types"].items()
            if t.get("accuracy") is not None
        ]
        head += [
            ("claims: format breaks", c["format_break_rate"]),
            ("claims: repeated verbatim", c["repeated_verbatim"]),
        ]
        if c.get("judged"):
            head.append(
                ("claims: judge supported (chance)", f"{_fmt(c['judged']['accuracy'])} ({_fmt(c['judged']['chance'])})")
            )
    head += [(f"fve @ {k} tokens", v) for k, v in r["fve_by_length"].items()]
    para = r.get("paraphrase") or {}
    if para:
        head += [("paraphrase fve_nrm", para.get("fve_nrm")), ("paraphrase fve_retained", para.get("fve_retained"))]
    order = r.get("order_shuffled") or {}
    if order.get("fve_nrm") is not None:
        head += [
            ("order-shuffled fve_nrm", order["fve_nrm"]),
            ("order-shuffled fve_retained", order.get("fve_retained")),
        ]
    if r.get("independent_ar"):
        head.append(("independent AR fve_nrm", r["independent_ar"]["fve_nrm"]))
    if r.get("teacher_explanations"):
        head.append(("ceiling: AR reading teacher text", r["teacher_explanations"]["fve_nrm"]))
    if r.get("oracle"):
        head += [
            ("ceiling: oracle AR, raw context", r["oracle"]["fve_nrm"]),
            ("fraction_of_oracle", r.get("fraction_of_oracle")),
        ]
    re_ = r.get("reinjection") or {}
    if re_.get("kl") is not None:
        head += [
            ("reinjection KL (reconstruction)", re_["kl"]),
            ("reinjection KL (mean activation)", re_["kl_mean_baseline"]),
            ("reinjection recovered", re_.get("recovered")),
        ]
    return head


def format_table(report: dict[str, Any]) -> str:
    """metric | value, then control | fve_nrm, for the terminal."""
    r = report
    lines = [f"{'metric':<34} value", "-" * 44] + [f"{k:<34} {_fmt(v)}" for k, v in headline_pairs(r)]
    lines += ["", f"{'control':<34} fve_nrm", "-" * 44, f"{'real explanations':<34} {_fmt(r['fve_nrm'])}"]
    lines += [f"{k:<34} {_fmt(v['fve_nrm'])}" for k, v in r["controls"].items()]
    lines += [f"{k:<34} {_fmt(v['fve_nrm'])}" for k, v in (r.get("baselines") or {}).items() if k in LOOKUPS]
    lines += [f"! {w}" for w in flags(r)]
    lines.append(f"(FVE: {r['fve_definition']}; Var {r['var']:.4f} from {r['var_source']})")
    return "\n".join(lines)


# ---------------------------------------------------------------- report.html

ROW_COLUMNS = (
    ("doc_id", "document"),
    ("position", "pos"),
    ("context", "context (the position's token marked)"),
    ("explanation", "explanation"),
    ("fve_nrm", "FVE"),
    ("reinjection_kl", "reinjection KL"),
    ("mse_nrm", "MSE"),
    ("failed", "failed"),
)

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 7px; vertical-align: top; }}
th {{ background: #f2f2f2; }}
#rows th {{ cursor: pointer; user-select: none; }}
#rows td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
#rows td.text {{ max-width: 34em; white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, monospace; font-size: 12px; }}
mark {{ background: #ffd54f; }}
.claim.true {{ background: #c8e6c9; }}
.claim.false {{ background: #ffcdd2; }}
.claim.unchecked {{ background: #eeeeee; }}
.claim.malformed {{ background: #ffe0b2; text-decoration: underline wavy #e65100; }}
.flag {{ color: #a33; }}
img {{ max-width: 32em; margin-right: 1em; border: 1px solid #ddd; }}
</style></head><body>
<h1>{title}</h1>
{summary}
<h2>Rows</h2>
<p>Claims: <span class="claim true">true</span> <span class="claim false">false</span>
 <span class="claim unchecked">unchecked</span> <span class="claim malformed">malformed</span> (hover for the checks)</p>
<p><input id="search" type="search" placeholder="filter rows (any text)" size="40"> <span id="count"></span>
 · click a column header to sort</p>
<table id="rows"><thead><tr>{header}</tr></thead><tbody>
{body}
</tbody></table>
<script>
(function () {{
  const table = document.getElementById("rows"), body = table.tBodies[0], count = document.getElementById("count");
  const rows = Array.from(body.rows);
  function shown() {{ count.textContent = rows.filter(r => r.style.display !== "none").length + " of " + rows.length + " rows"; }}
  document.getElementById("search").addEventListener("input", function (e) {{
    const q = e.target.value.toLowerCase();
    rows.forEach(r => {{ r.style.display = r.textContent.toLowerCase().includes(q) ? "" : "none"; }});
    shown();
  }});
  Array.from(table.tHead.rows[0].cells).forEach(function (th, col) {{
    th.addEventListener("click", function () {{
      const up = th.dataset.dir !== "asc";
      Array.from(table.tHead.rows[0].cells).forEach(h => delete h.dataset.dir);
      th.dataset.dir = up ? "asc" : "desc";
      const key = r => {{ const v = r.cells[col].dataset.v; return v === "" ? NaN : (isNaN(+v) ? v : +v); }};
      rows.sort(function (a, b) {{
        const x = key(a), y = key(b);
        if (typeof x === "number" && isNaN(x)) return 1;
        if (typeof y === "number" && isNaN(y)) return -1;
        return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
      }});
      rows.forEach(r => body.appendChild(r));
    }});
  }});
  shown();
}})();
</script>
</body></html>
"""


def _cell(key: str, row: dict[str, Any]) -> str:
    value = row.get(key)
    if key == "context":
        text = str(value or "")
        token = str(row.get("token") or "")
        if token and text.endswith(token):  # the explained position is the context's last token
            shown = html.escape(text[: -len(token)]) + "<mark>" + html.escape(token) + "</mark>"
        else:
            shown = html.escape(text)
        return f'<td class="text" data-v="{html.escape(text, quote=True)}">{shown}</td>'
    if key == "explanation" and row.get("claims"):  # each claim coloured by its verdict, its checks on hover
        spans = "; ".join(
            f'<span class="claim {c["verdict"]}" title="{html.escape(_checks_title(c), quote=True)}">'
            f"{html.escape(c['text'])}</span>"
            for c in row["claims"]
        )
        return f'<td class="text" data-v="{html.escape(str(value), quote=True)}">{spans}</td>'
    if isinstance(value, float):
        return f'<td class="num" data-v="{value!r}">{_fmt(value)}</td>'
    if isinstance(value, bool) or value is None:
        return f'<td data-v="{"" if value is None else int(value)}">{"" if value is None else ("yes" if value else "")}</td>'
    return f'<td class="text" data-v="{html.escape(str(value), quote=True)}">{html.escape(str(value))}</td>'


def _checks_title(claim: dict[str, Any]) -> str:
    checks = ", ".join(f"{k} {_fmt(float(v), 2)}" for k, v in claim["checks"].items())
    return f"{claim['type']}: {claim['verdict']}" + (f" ({checks})" if checks else "")


def html_page(
    title: str, rows: list[dict[str, Any]], report: dict[str, Any] | None = None, plots: dict[str, str] | None = None
) -> str:
    """One static page (no server, no network): the headline with its controls and flags, the plots
    inlined, and a sortable, searchable table of the rows."""
    columns = [(k, name) for k, name in ROW_COLUMNS if any(r.get(k) is not None for r in rows)]
    summary = []
    if report is not None:
        summary.append(
            "<h2>Headline</h2><table>"
            + "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in headline_pairs(report))
            + "</table>"
        )
        summary.append(
            "<h2>Controls (strict FVE on the same rows)</h2><table><tr><th>real explanations</th>"
            f"<td>{_fmt(report['fve_nrm'])}</td></tr>"
            + "".join(
                f"<tr><th>{html.escape(k)}</th><td>{_fmt(v['fve_nrm'])}</td></tr>"
                for k, v in [
                    *report.get("controls", {}).items(),
                    *((k, v) for k, v in (report.get("baselines") or {}).items() if k in LOOKUPS),
                ]
            )
            + "</table>"
        )
        summary += [f'<p class="flag">! {html.escape(w)}</p>' for w in flags(report)]
        summary.append(f"<p>FVE: {html.escape(str(report.get('fve_definition', '')))}</p>")
    for name, path in (plots or {}).items():
        data = base64.b64encode(Path(path).read_bytes()).decode()
        summary.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
    header = "".join(f"<th>{html.escape(name)}</th>" for _, name in columns)
    body = "\n".join("<tr>" + "".join(_cell(k, r) for k, _ in columns) + "</tr>" for r in rows)
    return _PAGE.format(title=html.escape(title), summary="\n".join(summary), header=header, body=body)
