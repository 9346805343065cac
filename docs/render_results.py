"""Render the results tables of README.md and docs/*.md from benchmarks/results/*.json.

    python docs/render_results.py           # rewrite every page's tables
    python docs/render_results.py --check   # exit 1 when a page differs from what it renders

A page holds a table between two markers, and this script owns what lies between them:

    <!-- results:NAME -->
    ...
    <!-- /results:NAME -->

NAME is a key of TABLES below. No figure of a results table is typed by hand: each comes
from a results file, and each table names that file and the machine it was measured on.
A figure that no file holds yet is rendered as "not measured yet".

Results files come in two generations. Files written from now on have one shape:

    {"benchmark", "command", "commit", "date",
     "machine": {"cpu", "flags", "cores", "gpu"}, "results": {...}}

and are found by their `benchmark` name: the README's served requests/s comes from the
newest file whose benchmark is `service` (bench_service.py) with
`results.load.requests_per_second`, its scoring images/s from `score` (bench_score.py) with
`results.images_per_second`. The older files
(quality-*.json, onnx-atypicality-*.json) keep their own shapes, read below one by one;
they do not record the machine, so LEGACY_MACHINES says what the measurement notes of the
day said about it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NOT_MEASURED = "not measured yet"

# The machine of each file written before results files recorded it, as noted at the time.
LEGACY_MACHINES = {
    "quality-2026-12-01.json": "a 2-core AMD EPYC (AVX512-BF16, no AMX), no GPU",
    "quality-rms-2026-12-01.json": "a 2-core AMD EPYC (AVX512-BF16, no AMX), no GPU",
    "quality-rms-lambda0-split1-2026-12-01.json": "a 2-core AMD EPYC (AVX512-BF16, no AMX), no GPU",
    "quality-rms-outlier-split0-2026-12-01.json": "a 2-core AMD EPYC (AVX512-BF16, no AMX), no GPU",
    "quality-atypicality-2026-12-01.json": "a 2-core Intel Xeon with AMX (AVX512-BF16), no GPU",
    "onnx-atypicality-2026-12-01.json": "a 2-core Intel Xeon with AMX (AVX512-BF16), no GPU",
}

FAR_OOD_SETS = [
    "uniform_noise",
    "gaussian_noise",
    "constant_colour",
    "blurred",
    "inverted",
    "glyphs",
    "shapes",
]

# --------------------------------------------------------------------------- reading


def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def new_shape_files() -> list[tuple[str, dict[str, Any]]]:
    """(file name, content) of every results file in the new shape, oldest date first."""
    found = []
    for path in sorted(RESULTS.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict) and {"benchmark", "machine", "results"} <= set(doc):
            found.append((path.name, doc))
    return sorted(found, key=lambda item: (str(item[1].get("date", "")), item[0]))


def newest(benchmark: str, key: str, defaults: bool = False) -> tuple[str, dict[str, Any]] | None:
    """The newest new-shape file of `benchmark` whose results hold `key` (dotted: nested);
    `defaults`: only runs with the command's default runtime (no --runtime in the command)."""
    hits = [(n, d) for n, d in new_shape_files() if d["benchmark"] == benchmark]
    hits = [(n, d) for n, d in hits if result(d, key) is not None]
    if defaults:
        hits = [(n, d) for n, d in hits if "--runtime" not in d.get("command", "")]
    return hits[-1] if hits else None


def result(doc: dict[str, Any], key: str) -> Any:
    """doc["results"][a][b] for key "a.b"; None where it is absent."""
    value: Any = doc.get("results", {})
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def machine_of(name: str, doc: dict[str, Any] | None = None) -> str:
    if doc is not None and isinstance(doc.get("machine"), dict):
        m = doc["machine"]
        gpu = m.get("gpu") or "no GPU"
        listed = m.get("flags") or []
        flags = f" ({', '.join([listed] if isinstance(listed, str) else listed)})" if listed else ""
        return f"{m.get('cpu', '?')}{flags}, {m.get('cores', '?')} cores, {gpu}"
    if name in LEGACY_MACHINES:
        return f"{LEGACY_MACHINES[name]} (noted at the time; the file does not record it)"
    return "not recorded"


def source_line(*names: str, docs: dict[str, dict[str, Any]] | None = None) -> str:
    """One 'measured on' line per results file a table read."""
    docs = docs or {}
    lines = []
    for name in dict.fromkeys(names):
        lines.append(
            f"Measured on {machine_of(name, docs.get(name))}; from `benchmarks/results/{name}`."
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- formatting


def stat(summary: dict[str, Any], key: str) -> dict[str, float] | None:
    value = summary.get(key)
    return value if isinstance(value, dict) and "mean" in value else None


def fmt(value: dict[str, float] | float | None, kind: str) -> str:
    """A figure (a {mean, std, n} or a number) as a percentage ("pct"), a share in points
    ("pts"), or a 3-decimal score ("auc")."""
    if value is None:
        return "—"
    mean = value["mean"] if isinstance(value, dict) else value
    std = value.get("std", 0.0) if isinstance(value, dict) else 0.0
    n = value.get("n", 1) if isinstance(value, dict) else 1
    if kind == "pct":
        text, spread = f"{100 * mean:.1f}%", f"{100 * std:.1f}%"
    elif kind == "pts":
        text, spread = f"{100 * mean:.1f}", f"{100 * std:.1f}"
    else:
        text, spread = f"{mean:.3f}", f"{std:.3f}"
    return f"{text} ± {spread}" if n > 1 else text


def pct(summary: dict[str, Any], key: str) -> str:
    return fmt(stat(summary, key), "pct")


def auc(summary: dict[str, Any], key: str) -> str:
    return fmt(stat(summary, key), "auc")


def pair(summary: dict[str, Any], first: str, second: str, sep: str = " / ") -> str:
    return f"{auc(summary, first)}{sep}{auc(summary, second)}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def far_ood_mean(summary: dict[str, Any], prefix: str = "far_ood") -> tuple[float, str, float]:
    """(mean AUROC over the far-OOD sets, the worst set, its AUROC) of a summary."""
    values = {s: summary[f"{prefix}.{s}.auroc"]["mean"] for s in FAR_OOD_SETS}
    worst = min(values, key=values.get)  # type: ignore[arg-type]
    return sum(values.values()) / len(values), worst, values[worst]


# --------------------------------------------------------------------------- tables

QUALITY = "quality-atypicality-2026-12-01.json"
QUALITY_BEFORE = "quality-2026-12-01.json"
ONNX = "onnx-atypicality-2026-12-01.json"


def measurement(key: str) -> dict[str, Any]:
    return load(QUALITY)["measurements"][key]


def headline() -> str:
    """The README's table: what the default `cpu` preset and its export give."""
    ten = measurement("ten_class_atypicality_98")
    splits = measurement("splits_atypicality_98")
    s, o = ten["summary"], splits["summary"]
    mean, worst, worst_auc = far_ood_mean(s)
    n = s["nearest_center_accuracy_onnx"]["n"]
    n_splits = o["open_set_auroc"]["n"]
    served = newest("service", "load.requests_per_second", defaults=True)
    scored = newest("score", "images_per_second", defaults=True)
    seeds, over_splits = f"{n} seeds", f"{n_splits} splits"
    far = f"{mean:.3f} (worst: {worst.replace('_', ' ')}, {worst_auc:.3f})"
    rows = [
        ["nearest-center test accuracy, plain (ONNX)", pct(s, "nearest_center_accuracy_onnx")],
        ["nearest-center test accuracy, flip + shift TTA", pct(s, "nearest_center_accuracy_tta")],
        ["MAP@R, test", auc(s, "map_at_r")],
        ["far-OOD AUROC, mean of 7 synthetic sets", far],
    ]
    rows = [[*row, seeds] for row in rows]
    rows.append(
        ["open-set AUROC, 6 known / 4 unknown classes", auc(o, "open_set_auroc"), over_splits]
    )
    files = [QUALITY]
    docs: dict[str, dict[str, Any]] = {}
    for label, found, key in [
        ("served requests/s, one image each, 32 clients", served, "load.requests_per_second"),
        ("scoring images/s, folder to Parquet", scored, "images_per_second"),
    ]:
        if found is None:
            rows.append([label, NOT_MEASURED, ""])
        else:
            name, doc = found
            value = f"{result(doc, key):,.0f}"
            ran = result(doc, "runtime")
            if isinstance(ran, dict):  # what served it, where the file records it
                value += f" ({ran.get('runtime')} {ran.get('precision')})"
            rows.append([label, value, doc.get("date", "")[:10]])
            files.append(name)
            docs[name] = doc
    return "\n\n".join(
        [
            table(["measure", "value", "over"], rows),
            "The `cpu` preset (12 epochs) on CIFAR-10, exported with the defaults.",
            source_line(*files, docs=docs),
        ]
    )


def _summary_rows(columns: list[dict[str, Any]], rows: list[tuple[str, str, str]]) -> list:
    out = []
    for label, key, kind in rows:
        cells = [fmt(stat(col, key), kind) for col in columns]
        if any(c != "—" for c in cells):
            out.append([label, *cells])
    return out


QUALITY_ROWS = [
    ("nearest-center test accuracy, plain (ONNX)", "nearest_center_accuracy_onnx", "pct"),
    ("nearest-center test accuracy, TTA (torch)", "nearest_center_accuracy_tta", "pct"),
    ("softmax test accuracy, plain (torch)", "softmax_accuracy", "pct"),
    ("MAP@R, test", "map_at_r", "auc"),
    ("precision@1, test", "precision_at_1", "pct"),
    ("open-set AUROC", "open_set_auroc", "auc"),
    ("open-set FPR95", "open_set_fpr95", "auc"),
    ("open-set AUROC on validation data (no test images)", "open_set_validation_auroc", "auc"),
    ("unknown classes' test images flagged", "open_set_flagged_unknown_classes", "pct"),
    *[
        (f"far-OOD `{s}`: AUROC", f"far_ood.{s}.auroc", "auc")
        for s in FAR_OOD_SETS
    ],
    *[
        (f"far-OOD `{s}`: share flagged unknown", f"far_ood.{s}.flagged", "pct")
        for s in FAR_OOD_SETS
    ],
    ("shift, grayscale CIFAR (not an unknown): AUROC", "shifted.grayscale.auroc", "auc"),
    ("correctly classified test images flagged unknown", "flagged_correct_test", "pct"),
    ("worst class: its flagged share's distance from 5% (points)",
     "worst_class_flagged_correct", "pts"),
    ("all test images flagged unknown", "flagged_all_test", "pct"),
]  # fmt: skip


def quality() -> str:
    """Before the embedding norm, the `rms` norm without and with the atypicality."""
    before = load(QUALITY_BEFORE)["summary"]
    m = load(QUALITY)["measurements"]
    plain = {**m["ten_class_no_atypicality"]["summary"], **m["splits_no_atypicality"]["summary"]}
    now = {**m["ten_class_atypicality_98"]["summary"], **m["splits_atypicality_98"]["summary"]}
    header = [
        "measure",
        "no embedding norm (splits at λ = 0)",
        "`rms` norm, `--no-atypicality`",
        "**default: `rms` + atypicality (98%)**",
    ]
    rows = _summary_rows([before, plain, now], QUALITY_ROWS)
    seeds = now["nearest_center_accuracy_onnx"]["n"]
    splits = now["open_set_auroc"]["n"]
    note = (
        f"Mean ± std over ten-class seeds ({seeds} for the `rms` columns, "
        f"{before['nearest_center_accuracy_onnx']['n']} for the first) and 6/4 splits "
        f"({splits}); the `rms` columns are the same networks exported two ways."
    )
    return "\n\n".join([table(header, rows), note, source_line(QUALITY_BEFORE, QUALITY)])


def atypicality() -> str:
    """The atypicality's variants on the same networks."""
    m = load(QUALITY)["measurements"]
    variants = [
        ("none (`--no-atypicality`)", "ten_class_no_atypicality", "splits_no_atypicality"),
        ("mean and std per channel, gate at 99% (first version; seed 0, split 1)",
         "first_statistics_seed0", "first_statistics_split1"),
        ("mean, std and mean absolute deviation, gate at 99%",
         "ten_class_atypicality_99", "splits_atypicality_99"),
        ("**the same, gate at 98% (default)**",
         "ten_class_atypicality_98", "splits_atypicality_98"),
    ]  # fmt: skip
    rows = []
    for label, ten_key, split_key in variants:
        s, o = m[ten_key]["summary"], m[split_key]["summary"]
        rows.append(
            [
                label,
                pair(s, "validation.far_ood.glyphs.auroc", "far_ood.glyphs.auroc"),
                pair(s, "validation.far_ood.blurred.auroc", "far_ood.blurred.auroc"),
                pair(s, "far_ood.shapes.auroc", "far_ood.constant_colour.auroc", ", "),
                auc(s, "far_ood.inverted.auroc"),
                pair(o, "open_set_validation_auroc", "open_set_auroc"),
                fmt(stat(s, "flagged_all_test"), "pct"),
            ]
        )  # fmt: skip
    header = [
        "atypicality",
        "glyphs AUROC, validation / test",
        "blurred AUROC, validation / test",
        "shapes, constant colour AUROC",
        "inverted AUROC",
        "open-set AUROC, validation / test",
        "all test images flagged",
    ]
    return "\n\n".join([table(header, rows), source_line(QUALITY)])


def scores() -> str:
    """Other unknown scores computed from the same networks (gate at 99%)."""
    m = load(QUALITY)["measurements"]
    far = m["ten_class_atypicality_99"]["summary"]["candidates_far_ood"]
    open_test = m["splits_atypicality_99"]["summary"]["candidates_open_set"]
    open_val = m["splits_atypicality_99"]["summary"]["candidates_open_set_validation"]
    rows = []
    for name in far:
        label = "**served: `min_distances`**" if name == "min_distances as served" else name
        rows.append(
            [
                label,
                f"{far[name]['mean_auroc']:.3f} / {far[name]['worst_auroc']:.3f}",
                f"{open_test[name]['mean_auroc']:.3f}" if name in open_test else "—",
                f"{open_val[name]['mean_auroc']:.3f}" if name in open_val else "—",
            ]
        )
    header = [
        "score",
        "far-OOD AUROC, mean / worst set",
        "open-set AUROC, test",
        "open-set AUROC, validation data",
    ]
    note = (
        "The served score includes the atypicality (gate at 99% in these runs); the others "
        "are computed from the embedding (and the classifier head, for max logit, energy "
        "and max softmax) alone."
    )
    return "\n\n".join([table(header, rows), note, source_line(QUALITY)])


def training_choices() -> str:
    """Training options measured on the 6/4 splits (and ten classes where run)."""
    m = load(QUALITY)["measurements"]
    cols = [
        ("label smoothing 0.2, λ = 0.01 (default)", "splits_atypicality_98"),
        ("label smoothing 0.1 (split 1)", "label_smoothing_0.1_split1"),
        ("label smoothing 0", "label_smoothing_0"),
        ("λ = 0.03 (split 1, first statistics)", "lambda_0.03_split1_first_statistics"),
        ("λ = 0.1 (split 1, first statistics)", "lambda_0.1_split1_first_statistics"),
        ("default, split 1 (first statistics)", "first_statistics_split1"),
    ]
    rows = []
    for label, key in cols:
        s = m[key]["summary"]
        if key == "splits_atypicality_98":  # the default's ten-class runs hold its MAP@R
            s = {**m["ten_class_atypicality_98"]["summary"], **s}
        rows.append(
            [
                label,
                str(s["open_set_auroc"]["n"]),
                fmt(stat(s, "open_set_validation_auroc"), "auc"),
                fmt(stat(s, "open_set_auroc"), "auc"),
                fmt(stat(s, "open_set_models_far_ood_auroc_mean"), "auc"),
                fmt(stat(s, "map_at_r"), "auc"),
            ]
        )
    header = [
        "training",
        "splits",
        "open-set AUROC, validation",
        "open-set AUROC, test",
        "far-OOD AUROC mean (6-class models)",
        "ten-class MAP@R",
    ]
    return "\n\n".join([table(header, rows), source_line(QUALITY)])


def single_runs() -> str:
    """One-run ablations before the atypicality: the embedding norm's first runs, λ = 0,
    outlier exposure."""
    files = [
        ("`rms` norm, λ = 0.01, no atypicality (mean of 3 splits)", "quality-rms-2026-12-01.json"),
        ("`rms` norm, λ = 0 (split 1)", "quality-rms-lambda0-split1-2026-12-01.json"),
        ("`rms` norm, outlier exposure (split 0)", "quality-rms-outlier-split0-2026-12-01.json"),
    ]  # fmt: skip
    rows = []
    for label, name in files:
        runs = load(name)["runs"]["open"]
        auroc = sum(r["auroc"] for r in runs) / len(runs)
        val = [r["validation"]["auroc"] for r in runs if "validation" in r]
        far = [
            sum(r["far_ood"][s]["auroc"] for s in FAR_OOD_SETS) / len(FAR_OOD_SETS) for r in runs
        ]
        rows.append(
            [
                label,
                f"{auroc:.3f}",
                f"{sum(val) / len(val):.3f}" if val else "—",
                f"{sum(far) / len(far):.3f}",
            ]
        )
    header = ["run", "open-set AUROC, test", "open-set AUROC, validation", "far-OOD AUROC mean"]
    return "\n\n".join([table(header, rows), source_line(*(n for _, n in files))])


def onnx_speed() -> str:
    d = load(ONNX)
    ips = d["images_per_second"]
    labels = [
        ("torch eager fp32", "torch"),
        ("onnxruntime fp32 (default export)", "ort-fp32"),
        ("onnxruntime fp32, `--no-atypicality`", "ort-fp32-no-atypicality"),
        ("onnxruntime int8 (`--int8`)", "ort-int8"),
    ]
    rows = [[label, f"{ips[f'{k}@1']:,.0f}", f"{ips[f'{k}@64']:,.0f}"] for label, k in labels]
    acc = d["test_accuracy"]
    note = (
        f"{d['threads']} thread; test accuracy fp32 {100 * acc['ort-fp32']:.2f}%, "
        f"int8 {100 * acc['ort-int8']:.2f}% (a drop of "
        f"{d['int8_accuracy_drop_points']:.2f} points)."
    )
    return "\n\n".join([table(["images/s", "batch 1", "batch 64"], rows), note, source_line(ONNX)])


def serving() -> str:
    """The service under 32 clients, per runtime: throughput, server CPU per request against
    the runtime alone, latency; and LitServe on the same file and requests."""
    rows, files, docs = [], [], {}
    services = [(n, d) for n, d in new_shape_files() if d["benchmark"] == "service"
                and result(d, "load.server_cpu_ms_per_request") is not None]  # fmt: skip
    for name, doc in services:
        r, load_ = doc["results"], doc["results"]["load"]
        cpu = statistics.median(c["total"] for c in load_["server_cpu_ms_per_request"])
        ran = f"{r['runtime']['runtime']} {r['runtime']['precision']}"
        rows.append([f"`serve`, {ran}, multipart", f"{load_['requests_per_second']:,.0f}",
                     f"{cpu:.2f} ({load_['median_cpu_ratio']:.2f}×)",
                     f"{r['single']['p50_ms']:.2f}"])  # fmt: skip
        files.append(name)
        docs[name] = doc
    for name, doc in [(n, d) for n, d in new_shape_files() if d["benchmark"] == "litserve"]:
        r = doc["results"]
        ran = f"{r['ours_runtime']['runtime']} {r['ours_runtime']['precision']}"
        for who, label in (("ours", f"`serve`, {ran}, JSON"),
                           ("LitServe", f"LitServe {r['litserve_version']}, onnxruntime fp32, "
                            "JSON")):  # fmt: skip
            f = r[who]
            rows.append([label, f"{f['requests_per_second']:,.0f}",
                         f"{f['cpu_ms_per_request']:.2f}",
                         f"{f['single']['p50_ms']:.2f}"])  # fmt: skip
        files.append(name)
        docs[name] = doc
    if not rows:
        return "No results file yet."
    header = ["server, runtime, payload", "requests/s, 32 clients",
              "server CPU ms per request (over the runtime alone)", "p50 ms, 1 client"]  # fmt: skip
    note = ("One image per request, CIFAR-10 test JPEGs. Server CPU: the server's process "
            "tree (decode workers included) over the requests answered; in brackets, over the "
            "runtime's own CPU per image at the batch size the server formed.")  # fmt: skip
    return "\n\n".join([table(header, rows), note, source_line(*files, docs=docs)])


def scoring() -> str:
    """`score` with its defaults against the runtimes alone, in process, on decoded images."""
    found = newest("score", "median_ratio_to_onnxruntime_fp32")
    if found is None:
        return "No results file yet."
    name, doc = found
    r = doc["results"]
    ran = f"{r['runtime']['runtime']} {r['runtime']['precision']}"
    speed = [f"{r['images_per_second']:,.0f}", f"{r['median_ratio']:.2f}×",
             f"{r['median_ratio_to_onnxruntime_fp32']:.2f}×"]  # fmt: skip
    rows = [[f"`score`, {ran}, {r['images']:,} JPEGs to Parquet", *speed]]
    header = ["scorer, runtime, input", "images/s", f"over {ran} alone",
              "over onnxruntime fp32 alone"]  # fmt: skip
    note = (f"Batch size {r['batch_size']}, {r['workers']} workers. The runs alone take the "
            "same images already decoded, in one process, with the faster of their threading "
            "choices; the scorer also decodes the JPEGs and writes Parquet. Median of "
            f"{len(r['ratios'])} rounds.")  # fmt: skip
    return "\n\n".join([table(header, rows), note, source_line(name, docs={name: doc})])


def new_results() -> str:
    """Every results file in the new shape, one table each."""
    found = new_shape_files()
    if not found:
        return "No results file in the new shape yet."
    parts = []
    for name, doc in found:
        flat = _flatten(doc["results"])
        # A benchmark's own pass marks (target_*) are for its console, not for these pages.
        rows = [[f"`{k}`", _number(v)] for k, v in flat.items()
                if not k.rpartition(".")[2].startswith("target")]  # fmt: skip
        parts.append(
            "\n\n".join(
                [
                    f"**{doc['benchmark']}**, {doc.get('date', '')}: `{doc.get('command', '')}`",
                    table(["result", "value"], rows),
                    source_line(name, docs={name: doc}),
                ]
            )
        )
    return "\n\n".join(parts)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"`{json.dumps(value)}`"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"


TABLES: dict[str, Callable[[], str]] = {
    "headline": headline,
    "quality": quality,
    "atypicality": atypicality,
    "scores": scores,
    "training-choices": training_choices,
    "single-runs": single_runs,
    "onnx-speed": onnx_speed,
    "serving": serving,
    "scoring": scoring,
    "new-results": new_results,
}

# --------------------------------------------------------------------------- pages

MARKED = re.compile(
    r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S
)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def render_page(text: str, rendered: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"unknown results table {name!r} (known: {', '.join(TABLES)})")
        if name not in rendered:
            rendered[name] = TABLES[name]()
        return f"{match[1]}{rendered[name]}\n{match[4]}"

    return MARKED.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page differs")
    args = parser.parse_args(argv)
    rendered: dict[str, str] = {}
    differ = []
    for page in pages():
        text = page.read_text()
        new = render_page(text, rendered)
        if new != text:
            differ.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new)
    if args.check and differ:
        names = ", ".join(map(str, differ))
        print(f"results tables out of date in: {names}; run python docs/render_results.py")
        return 1
    if not args.check:
        for page in differ:
            print(f"rewrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
