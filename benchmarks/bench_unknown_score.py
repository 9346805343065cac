"""Model format 2 against format 1 on the same network: does the served unknown score keep
its quality now that `distances` are true distances and the score is its own output?

    python benchmarks/bench_unknown_score.py runs/cpu/model.onnx --data ../shared/data/cifar10

One exported file, two readings of its embeddings and atypicality, side by side:
  format 2  the file's own `unknown_scores` output (what the service answers);
  format 1  what a format-1 export of the same network served as `min_distances`: the min
            over centers of ‖e − c‖² − ‖e‖², plus the atypicality (contract.center_scores
            with true_distances=False).
For each far-OOD set (center_embed.ood_sets) the AUROC of the known test images against it,
and the share of test images the `unknown` flag catches, in both; the largest difference is
the figure (0 expected: the score is the same quantity). Writes benchmarks/results JSON.
"""

from __future__ import annotations

import argparse

from _common import add_json_argument, write_results


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", help="an exported ONNX model of format 2 (the default export)")
    p.add_argument("--data", default="../shared/data/cifar10", help="its dataset (test split)")
    p.add_argument("--ood-images", type=int, default=1000, help="images per far-OOD set")
    add_json_argument(p)
    return p.parse_args()


def both_scores(model, images):
    """(format 2's unknown_scores, format 1's min distance) of `images`, and the labels."""
    from center_embed.contract import center_scores, read_centers

    out = model.run_batched(images)
    legacy = center_scores(out["embeddings"], read_centers(model.path),
                           "squared_euclidean_minus_norm", False, out["atypicality"])  # fmt: skip
    return out["unknown_scores"], legacy["min_distances"], out["labels"]


def main() -> int:
    args = parse_args()
    import numpy as np

    from center_embed import metrics, ood_sets
    from center_embed.data import load_for_classes
    from center_embed.runtime import OnnxModel, RuntimeOptions

    model = OnnxModel(args.model, RuntimeOptions(device="cpu"))
    test = load_for_classes(args.data, model.info.class_names, model.image_size).test
    new, old, labels = both_scores(model, test.images)
    rows = {}
    for name, images in ood_sets.far_ood_sets(test.images, args.ood_images).items():
        new_ood, old_ood, ood_labels = both_scores(model, images)
        rows[name] = {
            "auroc_format_2": metrics.auroc(new, new_ood),
            "auroc_format_1": metrics.auroc(old, old_ood),
            "flagged_format_2": float(model.info.unknown(new_ood, ood_labels).mean()),
            "flagged_format_1": float(model.info.unknown(old_ood, ood_labels).mean()),
        }
        r = rows[name]
        print(f"{name:<16} AUROC {r['auroc_format_2']:.4f} / {r['auroc_format_1']:.4f}, "
              f"flagged {r['flagged_format_2']:.3f} / {r['flagged_format_1']:.3f} "
              "(format 2 / 1)")  # fmt: skip
    gap = max(abs(r[f"{k}_format_2"] - r[f"{k}_format_1"]) for r in rows.values()
              for k in ("auroc", "flagged"))  # fmt: skip
    score_gap = float(np.abs(new - old).max() / np.abs(old).max())
    print(f"largest difference, format 2 against format 1: {gap:.2e} (AUROC or flagged share); "
          f"scores {score_gap:.2e} relative")  # fmt: skip
    write_results("unknown-score", {"model": args.model, "test_images": len(labels),
                                    "sets": rows, "largest_difference": gap,
                                    "score_relative_difference": score_gap}, args.json)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
