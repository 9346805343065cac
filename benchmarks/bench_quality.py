"""The quality of the served distances, measured from the ONNX model as users get it.

    python benchmarks/bench_quality.py --work runs/quality --seeds 3 --splits 3 \
        --split-tag lambda0 --split-set loss.center_weight=0 --candidates

For each seed it trains the `cpu` preset on all ten CIFAR-10 classes, and for each 6/4 split
the same preset on six classes (the other four are the unknowns); it exports each run
(`center-embed export`, fp32) and runs everything below through onnxruntime:

- test accuracy: nearest-center through the ONNX model, and the run's own eval.json
  (torch: nearest-center and softmax, plain and with TTA);
- retrieval: precision@1 and MAP@R of the test embeddings, ranked by the model's distance;
- far-OOD: AUROC and FPR95 of the served `unknown_scores`, test images against each set of
  center_embed.ood_sets.far_ood_sets, and the share of each set the `unknown` flag catches;
- open-set: AUROC and FPR95 of the served score, the six known classes' test images
  against the four unknown classes' (mean ± std over the splits);
- calibration of the `unknown` flag: the share of correctly classified test images it
  flags (expected 1 − quantile), globally and per class, and the share of all test images;
- the same measures without the test split, for choosing among models and scores: the
  run's held-out validation images against far-OOD sets built from them (another seed),
  their retrieval figures, and (six classes) against unseen classes' training images;
- `--candidates`: the same detection figures for other scores computed from the same model
  (the ablation table in the README), the classifier-head ones needing the checkpoint;
  the scores computed from the embedding alone leave out the model's `atypicality`.

`--model-name` with `--export-arg` exports a variant of every run beside the first (e.g.
`--model-name plain.onnx --export-arg=--no-atypicality`), so export options are compared
on the same networks.

Runs already in --work (eval.json, the --model-name file) are reused, so a table can be rebuilt, or
extended with more seeds, without retraining. Training overrides go through --set.
Prints one table and writes every figure as JSON (benchmarks/_common.py's record: the
command, the commit, the machine), to benchmarks/results/quality-<tag>-<date>.json or --json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import ROOT, add_json_argument, write_results

from center_embed import metrics, ood_sets
from center_embed.contract import distances, read_centers
from center_embed.data import load_dataset, select_classes, split_validation
from center_embed.runtime import OnnxModel, RuntimeOptions

CLI = [sys.executable, "-m", "center_embed.cli"]


def main() -> None:
    args = parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(args.data)
    runs = [(f"{args.tag}-all-s{seed}", [], seed, args.set) for seed in range(args.seeds)]
    split_tag = args.split_tag or args.tag
    splits = [int(k) for k in args.split_ids.split(",")] if args.split_ids else range(args.splits)
    runs += [(f"{split_tag}-split{k}-s0", known_classes(dataset.class_names, k), 0,
              args.set + args.split_set) for k in splits]  # fmt: skip
    results = {"closed": [], "open": []}
    for name, classes, seed, overrides in runs:
        model_path = prepare(work / name, args, classes, seed, overrides)
        started = time.perf_counter()
        if classes:
            result = open_set(model_path, dataset, classes, args)
            results["open"].append(result)
        else:
            result = closed_set(model_path, dataset, args)
            results["closed"].append(result)
        result["run"] = name
        result["model"] = model_path.name
        print(f"{name}: measured in {time.perf_counter() - started:.0f} s", flush=True)
    summary = summarise(results)
    print(format_table(summary))
    write_results(f"quality-{args.tag}", {"summary": summary, "runs": results}, args.json)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10"))
    p.add_argument("--work", default="runs/quality", help="where the runs are kept")
    p.add_argument("--tag", default="base", help="run name prefix (an ablation's name)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--splits", type=int, default=3)
    p.add_argument("--split-ids", default="", help="e.g. 1,3: these splits instead of --splits")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument(
        "--split-set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="more overrides for the 6-class runs only (the cpu preset's λ = 0.01 "
        "diverges on six classes: --split-set loss.center_weight=0)",
    )
    p.add_argument("--split-tag", default="", help="name prefix of the 6-class runs (--tag)")
    p.add_argument("--export-arg", action="append", default=[], help="passed to export")
    p.add_argument("--model-name", default="model.onnx", help="the exported file in each run")
    p.add_argument("--ood-images", type=int, default=1000, help="images per far-OOD set")
    p.add_argument("--candidates", action="store_true", help="also score other scores")
    add_json_argument(p)  # default: benchmarks/results/quality-<tag>-<date>.json
    return p.parse_args()


def known_classes(class_names: list[str], split: int) -> list[str]:
    """Split k: four classes drawn by default_rng(k) are unknown, the other six known."""
    unknown = set(np.random.default_rng(split).choice(len(class_names), 4, replace=False))
    return [c for i, c in enumerate(class_names) if i not in unknown]


def prepare(run: Path, args, classes: list[str], seed: int, overrides: list[str]) -> Path:
    """Train (unless the run finished before) and export (unless exported); the model path."""
    if not (run / "eval.json").exists():
        command = [*CLI, "train", "--preset", args.preset, "--data", args.data, "--out", str(run)]
        command += ["--set", f"train.seed={seed}", "--set", "train.progress=false"]
        command += [a for s in overrides for a in ("--set", s)]
        if classes:
            command += ["--classes", ",".join(classes)]
        if (run / "last.pt").exists():
            command += ["--resume", str(run)]
        run_command(command)
    model = run / args.model_name
    if not model.exists():
        run_command([*CLI, "export", str(run / "best.pt"), "--out", str(model), *args.export_arg])
    return model


def run_command(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


# --------------------------------------------------------------------------- measuring


def closed_set(model_path: Path, dataset, args) -> dict:
    """All ten classes known: accuracy, retrieval, far-OOD detection, calibration."""
    model = OnnxModel(model_path, RuntimeOptions(device="cpu"))
    info = model.info
    test = select_classes(dataset, info.class_names).test
    out = model.run_batched(test.images)
    correct = out["labels"] == test.labels
    served = model.unknown(out)
    result = {
        "nearest_center_accuracy_onnx": float(correct.mean()),
        "torch_eval": torch_eval(model_path.parent),
        **metrics.retrieval_metrics(out["embeddings"], test.labels),
        "calibration": metrics.flagged_shares(served, test.labels, correct, info.class_names),
        "quantile": calibration_quantile(info),
        "far_ood": {},
        "shifted": {},
    }
    groups = {
        "far_ood": ood_sets.far_ood_sets(test.images, args.ood_images),
        "shifted": ood_sets.shifted_sets(test.images, args.ood_images),
    }
    scorers = candidate_scorers(model_path, dataset, info) if args.candidates else {}
    known_scores = {name: score(out) for name, score in scorers.items()}
    result["validation"] = closed_set_validation(model, dataset, args)
    for group, sets in groups.items():
        for set_name, images in sets.items():
            other = model.run_batched(images)
            entry = detection(out["unknown_scores"], other["unknown_scores"])
            entry["flagged"] = float(model.unknown(other).mean())
            entry["candidates"] = {
                name: detection(known_scores[name], score(other)) for name, score in scorers.items()
            }
            result[group][set_name] = entry
    return result


def open_set(model_path: Path, dataset, classes: list[str], args) -> dict:
    """Six classes known, four unknown: known vs unknown test images by the served score."""
    model = OnnxModel(model_path, RuntimeOptions(device="cpu"))
    known_index = [dataset.class_names.index(c) for c in classes]
    is_known = np.isin(dataset.test.labels, known_index)
    out = model.run_batched(dataset.test.images)
    known_out = {k: v[is_known] for k, v in out.items()}
    unknown_out = {k: v[~is_known] for k, v in out.items()}
    result = {
        "known": classes,
        "unknown": [c for c in dataset.class_names if c not in classes],
        **detection(known_out["unknown_scores"], unknown_out["unknown_scores"]),
        "flagged_unknown_classes": float(model.unknown(unknown_out).mean()),
        "flagged_known_classes": float(model.unknown(known_out).mean()),
    }
    scorers = candidate_scorers(model_path, dataset, model.info) if args.candidates else {}
    result["candidates"] = {
        name: detection(score(known_out), score(unknown_out)) for name, score in scorers.items()
    }
    result["validation"] = open_set_validation(model, dataset, known_index, scorers)
    # The far-OOD sets against the six known classes too: an ablation trained on a split
    # is compared on both kinds of unknowns without a second, ten-class run.
    result["far_ood"] = {}
    known_images = dataset.test.images[is_known]
    for set_name, images in ood_sets.far_ood_sets(known_images, args.ood_images).items():
        other = model.run_batched(images)
        entry = detection(known_out["unknown_scores"], other["unknown_scores"])
        entry["flagged"] = float(model.unknown(other).mean())
        entry["candidates"] = {
            name: detection(score(known_out), score(other)) for name, score in scorers.items()
        }
        result["far_ood"][set_name] = entry
    return result


def validation_split(model, dataset):
    """The run's held-out validation images (its data config, from the checkpoint)."""
    from center_embed.training.checkpoint import Checkpoint

    cfg = Checkpoint.load(model.path.parent / "best.pt").config.data
    known_train = select_classes(dataset, model.info.class_names).train
    return split_validation(known_train, cfg.val_size, cfg.seed)[1]


def closed_set_validation(model, dataset, args) -> dict:
    """Far-OOD detection and retrieval without the test split: the validation images
    against far-OOD sets built from them with another seed."""
    val = validation_split(model, dataset)
    out = model.run_batched(val.images)
    result = {
        "nearest_center_accuracy": float((out["labels"] == val.labels).mean()),
        **metrics.retrieval_metrics(out["embeddings"], val.labels),
        "far_ood": {},
    }
    for set_name, images in ood_sets.far_ood_sets(val.images, args.ood_images, seed=1).items():
        other = model.run_batched(images)
        entry = detection(out["unknown_scores"], other["unknown_scores"])
        entry["flagged"] = float(model.unknown(other).mean())
        result["far_ood"][set_name] = entry
    return result


def open_set_validation(model, dataset, known_index: list[int], scorers: dict) -> dict:
    """The open-set measure without the test split, for choosing among models and scores:
    the run's held-out validation images (known) against 4,000 training-folder images of the
    four classes it never trained on (unknown)."""
    val = validation_split(model, dataset)
    unseen = np.flatnonzero(~np.isin(dataset.train.labels, known_index))
    unseen = np.sort(np.random.default_rng(0).permutation(unseen)[:4000])
    known_out = model.run_batched(val.images)
    unknown_out = model.run_batched(dataset.train.images[unseen])
    entry = detection(known_out["unknown_scores"], unknown_out["unknown_scores"])
    entry["candidates"] = {
        name: detection(score(known_out), score(unknown_out)) for name, score in scorers.items()
    }
    return entry


def detection(known: np.ndarray, unknown: np.ndarray) -> dict[str, float]:
    return {
        "auroc": metrics.auroc(known, unknown),
        "fpr95": metrics.fpr_at_tpr(known, unknown),
    }


def torch_eval(run: Path) -> dict:
    """The run's own test evaluation (torch, bf16): softmax and TTA figures."""
    path = run / "eval.json"
    if not path.exists():
        return {}
    e = json.loads(path.read_text())
    tta = e.get("tta") or {}
    return {
        "nearest_center_accuracy": e.get("nearest_center_accuracy"),
        "softmax_accuracy": e.get("softmax_accuracy"),
        "nearest_center_accuracy_tta": tta.get("nearest_center_accuracy"),
        "softmax_accuracy_tta": tta.get("softmax_accuracy"),
    }


def calibration_quantile(info) -> float | None:
    facts = json.loads(info.metadata.get("center_embed.unknown_threshold_calibration", "{}"))
    return facts.get("quantile")


# --------------------------------------------------------------------------- candidates


def candidate_scorers(model_path: Path, dataset, info) -> dict:
    """score name -> function(outputs) -> (N,) score, higher = more likely unknown.

    The classifier-head scores need the run's checkpoint (the ONNX file has no head);
    "re-estimated" centers are the class means of the run's own training embeddings.
    """
    from center_embed.training.checkpoint import Checkpoint

    ckpt = Checkpoint.load(model_path.parent / "best.pt")
    centers = read_centers(model_path)
    weights = ckpt.model_state["classifier.weight"].float().numpy()
    scale = float(ckpt.config.model.logit_scale)
    means = training_means(model_path, dataset, info, ckpt.config.data)
    unit_centers = centers / np.linalg.norm(centers, axis=1, keepdims=True)

    def logits(out):
        return out["embeddings"] @ weights.T * scale

    def logsumexp(x):
        m = x.max(1, keepdims=True)
        return (m + np.log(np.exp(x - m).sum(1, keepdims=True)))[:, 0]

    def unit(e):
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

    def nearest(kind, to=centers):
        return lambda out: distances(out["embeddings"], to, kind).min(1)

    return {
        "unknown_scores as served": lambda out: out["unknown_scores"],
        "squared distance": nearest("squared_euclidean"),
        "squared distance, re-estimated centers": nearest("squared_euclidean", means),
        "‖e − c‖² − ‖e‖²": nearest("squared_euclidean_minus_norm"),
        "‖e − c‖² − ‖e‖², re-estimated centers": nearest("squared_euclidean_minus_norm", means),
        "‖e − c‖² − ½‖e‖²": lambda out: (
            distances(out["embeddings"], centers, "squared_euclidean").min(1)
            - 0.5 * (out["embeddings"] ** 2).sum(1)
        ),
        "cosine to centers": lambda out: 1 - (unit(out["embeddings"]) @ unit_centers.T).max(1),
        "projection on centers": lambda out: -(out["embeddings"] @ unit_centers.T).max(1),
        "max logit": lambda out: -logits(out).max(1),
        "energy": lambda out: -logsumexp(logits(out)),
        "max softmax": lambda out: -np.exp(logits(out) - logsumexp(logits(out))[:, None]).max(1),
        "embedding norm": lambda out: -np.linalg.norm(out["embeddings"], axis=1),
    }


def training_means(model_path: Path, dataset, info, cfg, per_class: int = 1000) -> np.ndarray:
    """Class means of the embeddings of up to `per_class` training images per class (the
    run's validation images, which its data config `cfg` held out, excluded)."""
    train, _ = split_validation(select_classes(dataset, info.class_names).train, cfg.val_size,
                                cfg.seed)  # fmt: skip
    rng = np.random.default_rng(0)
    picks = np.concatenate([
        rng.permutation(np.flatnonzero(train.labels == j))[:per_class]
        for j in range(info.num_classes)
    ])  # fmt: skip
    model = OnnxModel(model_path, RuntimeOptions(device="cpu"))
    e = model.run_batched(train.images[np.sort(picks)])["embeddings"]
    labels = train.labels[np.sort(picks)]
    return np.stack([e[labels == j].mean(0) for j in range(info.num_classes)]).astype(np.float32)


# --------------------------------------------------------------------------- the table


def mean_std(values: list[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None], np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "n": int(len(v))}  # fmt: skip


def summarise(results: dict) -> dict:
    closed, open_ = results["closed"], results["open"]
    s: dict = {}
    if closed:
        s["nearest_center_accuracy_onnx"] = mean_std(
            [r["nearest_center_accuracy_onnx"] for r in closed]
        )
        for key in ("softmax_accuracy", "nearest_center_accuracy_tta", "softmax_accuracy_tta"):
            s[key] = mean_std([r["torch_eval"].get(key) for r in closed])
        for key in ("precision_at_1", "map_at_r"):
            s[key] = mean_std([r[key] for r in closed])
        s["flagged_correct_test"] = mean_std([r["calibration"]["correct_images"] for r in closed])
        s["flagged_all_test"] = mean_std([r["calibration"]["all_images"] for r in closed])
        s["worst_class_flagged_correct"] = mean_std([
            max(abs(v - (1 - r["quantile"])) for v in r["calibration"]["per_class_correct"].values()
                if v is not None)
            for r in closed
        ])  # fmt: skip
        for group in ("far_ood", "shifted"):
            for name in closed[0][group]:
                for key in ("auroc", "fpr95", "flagged"):
                    s[f"{group}.{name}.{key}"] = mean_std([r[group][name][key] for r in closed])
        s["candidates_far_ood"] = summarise_candidates(
            [e["candidates"] for r in closed for e in r["far_ood"].values()]
        )
        validated = [r["validation"] for r in closed]
        for key in ("nearest_center_accuracy", "map_at_r"):
            s[f"validation.{key}"] = mean_std([v[key] for v in validated])
        for name in validated[0]["far_ood"]:
            for key in ("auroc", "flagged"):
                s[f"validation.far_ood.{name}.{key}"] = mean_std(
                    [v["far_ood"][name][key] for v in validated]
                )
    if open_:
        s["open_set_auroc"] = mean_std([r["auroc"] for r in open_])
        s["open_set_fpr95"] = mean_std([r["fpr95"] for r in open_])
        s["open_set_flagged_unknown_classes"] = mean_std(
            [r["flagged_unknown_classes"] for r in open_]
        )
        s["candidates_open_set"] = summarise_candidates([r["candidates"] for r in open_])
        s["open_set_validation_auroc"] = mean_std([r["validation"]["auroc"] for r in open_])
        s["candidates_open_set_validation"] = summarise_candidates(
            [r["validation"]["candidates"] for r in open_]
        )
        far = [r["far_ood"] for r in open_]
        s["open_set_models_far_ood_auroc_mean"] = mean_std(
            [float(np.mean([e["auroc"] for e in f.values()])) for f in far]
        )
        s["open_set_models_far_ood_auroc_worst"] = mean_std(
            [min(e["auroc"] for e in f.values()) for f in far]
        )
    return s


def summarise_candidates(entries: list[dict]) -> dict:
    """candidate -> mean AUROC and the worst (lowest) AUROC over the entries given."""
    names = entries[0].keys() if entries and entries[0] else []
    return {
        name: {
            "mean_auroc": float(np.mean([e[name]["auroc"] for e in entries])),
            "worst_auroc": float(np.min([e[name]["auroc"] for e in entries])),
        }
        for name in names
    }


def format_table(s: dict) -> str:
    lines = ["measure | mean ± std (n)", "---|---"]
    for key, value in s.items():
        if isinstance(value, dict) and "mean" in value:
            lines.append(f"{key} | {value['mean']:.4f} ± {value['std']:.4f} ({value['n']})")
    for group in ("candidates_far_ood", "candidates_open_set", "candidates_open_set_validation"):
        if s.get(group):
            lines += ["", f"{group}: score | mean AUROC | worst AUROC", "---|---|---"]
            for name, v in s[group].items():
                lines.append(f"{name} | {v['mean_auroc']:.4f} | {v['worst_auroc']:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
