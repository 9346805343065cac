"""bench_gpu.py's tables: the summary of a results file (`bench_gpu.py --summary`), and
the mean ± std over seeds that the stages record. No torch: it reads JSON."""

from __future__ import annotations

import math
import statistics
from typing import Any

NUMBERS = ["loop_seconds", "wall_seconds", "setup_seconds", "images_per_second"]
ACCURACY = [
    ("test", "nearest_center_accuracy"),
    ("test_tta", "nearest_center_accuracy"),
    ("test", "softmax_accuracy"),
    ("test_tta", "softmax_accuracy"),
]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, float]:
        values = [v for v in values if v is not None]
        if not values:
            return {"mean": math.nan, "std": math.nan, "n": 0}
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return {"mean": round(statistics.fmean(values), 5), "std": round(std, 5), "n": len(values)}

    out = {key: stats([r.get(key) for r in runs]) for key in NUMBERS}
    for split, key in ACCURACY:
        out[f"{split}.{key}"] = stats([r[split][key] for r in runs])
    return out


def table(record: dict[str, Any]) -> str:
    """The summary of a results file: training runs, inference, syncs, what-ifs, stages."""
    results = record.get("results", record)  # a file from before the common record: itself
    stages = results.get("stages", {})
    env = results.get("environment", {})
    lines = [
        f"{env.get('gpu') or env.get('device')}, torch {env.get('torch')}, "
        f"commit {str(record.get('commit') or env.get('git_commit'))[:12]}, "
        f"source {env.get('source_sha256')}"
    ]
    lines += training_table(stages)
    lines += inference_lines(stages.get("inference", {}).get("result", {}))
    audit = stages.get("syncaudit", {}).get("result", {})
    if audit.get("locations"):
        top = ", ".join(f"{r['where']} {r['per_step']}/step" for r in audit["locations"][:4])
        lines.append(f"host syncs in one epoch ({audit['steps']} steps): {top}")
    extra = stages.get("extra", {}).get("result", {})
    for run in extra.values():
        if isinstance(run, dict):
            lines.append(
                f"{run['label']}: loop {run['loop_seconds']} s, wall {run['wall_seconds']} s, "
                f"NC {100 * run['test']['nearest_center_accuracy']:.2f} / TTA "
                f"{100 * run['test_tta']['nearest_center_accuracy']:.2f}"
            )
    for key in ("cudnn", "compile"):
        lines += what_if_lines(key, stages.get(key, {}).get("result"))
    status = ", ".join(f"{k} {v.get('status')} ({v.get('seconds')} s)" for k, v in stages.items())
    lines.append(f"stages: {status}")
    return "\n".join(lines)


def cell(s: dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
    """mean±std of one summarised figure; "-" where there was none."""
    if not s or s.get("n", 0) == 0:
        return "-"
    return f"{s['mean'] * scale:.{digits}f}±{s['std'] * scale:.{digits}f}"


def training_table(stages: dict[str, Any]) -> list[str]:
    """Mean ± std over seeds of the `gpu` (λ and λ = 0) and `gpu-wide` runs, and the ratio."""
    rows: list[tuple[str, dict[str, Any]]] = []
    gpu = stages.get("gpu", {}).get("result", {})
    for kind, name in (("lambda", "gpu, λ as preset"), ("lambda0", "gpu, λ = 0")):
        if kind in gpu.get("summary", {}):
            rows.append((name, gpu["summary"][kind]))
    wide = stages.get("wide", {}).get("result", {})
    if wide.get("summary"):
        rows.append(("gpu-wide", wide["summary"]))
    head = (
        f"{'runs':<18}{'n':>3} {'loop s':>14} {'wall s':>14} {'img/s':>16}"
        f" {'NC':>15} {'NC TTA':>15} {'softmax':>15} {'softmax TTA':>15}"
    )
    lines = [head, "-" * len(head)]
    for name, s in rows:
        acc = [cell(s[f"{split}.{key}"], 100, 2) for split, key in ACCURACY]
        lines.append(
            f"{name:<18}{s['loop_seconds']['n']:>3} {cell(s['loop_seconds']):>14}"
            f" {cell(s['wall_seconds']):>14} {cell(s['images_per_second'], 1, 0):>16}"
            + "".join(f" {a:>15}" for a in acc)
        )
    ratio = gpu.get("summary", {}).get("time_ratio_lambda_over_lambda0")
    if ratio is not None:
        lines.append(f"loop time λ>0 / λ=0: {ratio:.3f}")
    return lines


def speeds(result: dict[str, Any]) -> str:
    return "; ".join(
        f"{k} {v['images_per_second']:.0f}/s (p50 {v['p50_ms']:.2f} ms)"
        for k, v in result.items()
        if isinstance(v, dict) and "p50_ms" in v
    )


def inference_lines(inference: dict[str, Any]) -> list[str]:
    """torch's and onnxruntime's images/s and p50 latency per precision and batch."""
    lines = []
    if speeds(inference):
        lines.append("torch inference: " + speeds(inference))
    ort_result = inference.get("onnxruntime", {})
    if "skipped" in ort_result:
        lines.append(f"onnxruntime: {ort_result['skipped']}")
    elif ort_result:
        lines.append("onnxruntime: " + speeds(ort_result))
    return lines


def what_if_lines(key: str, value: dict[str, Any] | None) -> list[str]:
    """The cudnn and compile stages: first run (autotuning, compiling) and second run."""
    if value is None:
        return []
    if "skipped" in value:
        return [f"{key}: skipped, {value['skipped']}"]
    if "first" not in value:
        return [f"{key}: {k}: {v}"[:300] for k, v in value.items()]
    a, b = value["first"], value["second"]
    return [
        f"{key}: loop {a['loop_seconds']} s (first run), {b['loop_seconds']} s "
        f"(second), wall {a['wall_seconds']} / {b['wall_seconds']} s, NC "
        f"{100 * b['test']['nearest_center_accuracy']:.2f}"
    ]
