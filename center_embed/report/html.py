"""The report as one HTML page: tables of figures with their sources, and the plots.

The PNGs are embedded as data URIs, so index.html can be mailed or moved on its own; they
are also saved beside it. No scripts, no external styles.
"""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path
from typing import Any

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f2f2f2; }
.source { color: #555; font-size: 0.9em; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #444; font-size: 0.95em; }
code { background: #f5f5f5; padding: 0 0.2em; }
"""

CAPTIONS = {
    "embedding_2d": "Test embeddings in two dimensions, coloured by true class; the crosses are "
    "the learned class centers (projected the same way). Center loss pulls each class "
    "toward its center, as in Wen et al. (2016), figure 1.",
    "confusion": "Confusion matrix of the nearest-center labels the ONNX model outputs: rows are "
    "the true classes, columns the predicted ones; each cell shows the share of its row "
    "and the count.",
    "unknown_score_hist": "The unknown score (higher = more unknown), for images the model "
    "labels correctly and wrongly, with the unknown threshold stored in the model: images "
    "beyond it are flagged unknown by the service and the scorer.",
    "training_curves": "The run's metrics.jsonl, one point per epoch: training losses and "
    "the validation figures measured during training (held-out part of train, torch).",
}


def _cell_text(value: Any, digits: int = 4) -> str:
    """A table cell's text: floats to `digits` places, None as n/a, the rest escaped."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return escape(str(value))


def _row(name: str, value: Any, source: str) -> str:
    return (
        f"<tr><td>{escape(name)}</td><td class='num'>{_cell_text(value)}</td>"
        f"<td class='source'>{escape(source)}</td></tr>"
    )


def _headline(report: dict[str, Any]) -> str:
    m, soft = report["onnx"], report["softmax"]
    here = f"ONNX model, {report['data']['split']} split ({report['data']['images']} images)"
    rows = [
        _row("nearest-center accuracy", m["nearest_center_accuracy"], here),
        _row("retrieval precision@1", m["precision_at_1"], here + ", leave-one-out"),
        _row("retrieval MAP@R", m["map_at_r"], here + ", leave-one-out"),
        _row("intra/inter distance ratio", m["intra_inter_ratio"], here + ", lower is tighter"),
        _row("share flagged unknown", m["unknown_rate"], here + ", at the model's threshold"),
        _row("accuracy on images not flagged unknown", m["accuracy_on_known"], here),
    ]
    if soft:
        src = soft["source"] + (f", data {soft['data']}" if soft.get("data") else "")
        rows.insert(1, _row("softmax accuracy", soft["softmax_accuracy"], src))
        if "tta_softmax_accuracy" in soft:
            rows.insert(
                2,
                _row(
                    f"softmax accuracy, test-time augmentation {soft['tta_level']}",
                    soft["tta_softmax_accuracy"],
                    src,
                ),
            )
        if "torch_nearest_center_accuracy" in soft:
            rows.append(
                _row(
                    "nearest-center accuracy (torch, for comparison)",
                    soft["torch_nearest_center_accuracy"],
                    src,
                )
            )
    else:
        rows.insert(
            1,
            _row(
                "softmax accuracy",
                None,
                "not available: the ONNX model has no logits; pass --run with an eval.json",
            ),
        )
    head = "<tr><th>figure</th><th>value</th><th>where it comes from</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _per_class(report: dict[str, Any]) -> str:
    m = report["onnx"]
    confusion = m["confusion_matrix"]
    head = "<tr><th>class</th><th>test images</th><th>nearest-center accuracy</th></tr>"
    rows = []
    for j, name in enumerate(report["model"]["classes"]):
        count = sum(confusion[j])
        rows.append(
            f"<tr><td>{escape(name)}</td><td class='num'>{count}</td>"
            f"<td class='num'>{_cell_text(m['per_class_accuracy'][name])}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _model_facts(report: dict[str, Any]) -> str:
    model, data = report["model"], report["data"]
    calibration = model.get("unknown_threshold_calibration")
    rows = [
        ("model", model["path"]),
        ("sha256", model["sha256"]),
        ("embedding dimension", model["embedding_dim"]),
        ("classes", ", ".join(model["classes"])),
        ("precision / execution provider", f"{model['precision']} / {model['provider']}"),
        ("unknown threshold (a min distance)", model["unknown_threshold"]),
        ("threshold calibration", json.dumps(calibration) if calibration else "n/a"),
        ("data", f"{data['path']} ({data['split']} split, {data['images']} images)"),
        ("run folder", report["run"] or "none given (no training curves)"),
    ]
    cells = "".join(f"<tr><th>{escape(k)}</th><td>{_cell_text(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _figures(report: dict[str, Any], out: Path) -> str:
    parts = []
    for key, name in report["plots"].items():
        data = base64.b64encode((out / name).read_bytes()).decode()
        parts.append(
            f"<figure><img src='data:image/png;base64,{data}' alt='{escape(key)}'>"
            f"<figcaption>{escape(CAPTIONS[key])} (also saved as <code>{escape(name)}</code>)"
            f"</figcaption></figure>"
        )
    return "".join(parts)


def render_html(report: dict[str, Any], out: Path) -> str:
    title = f"center-embed report: {Path(report['model']['path']).name}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{escape(title)}</h1>
<p>Every figure about the embeddings is computed by <code>center-embed report</code> from the
ONNX model's outputs (embeddings, distances, nearest-center labels) on the
{escape(report["data"]["split"])} split of <code>{escape(report["data"]["path"])}</code>.
The ONNX model outputs no logits, so the softmax accuracy is copied from elsewhere, as the
table says. The same numbers are in <code>metrics.json</code> beside this page.</p>
<h2>Summary</h2>
{_headline(report)}
<h2>Per class</h2>
{_per_class(report)}
<h2>Figures</h2>
{_figures(report, out)}
<h2>Model and data</h2>
{_model_facts(report)}
</body></html>
"""
