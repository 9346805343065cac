"""Which layers and statistics the atypicality should use: the study behind
export/atypicality.py's choices, on validation images only (no test split).

    python benchmarks/bench_atypicality_layers.py runs/quality/rms-all-s0

For a run's checkpoint it pools every feature map of the network (EmbeddingNet.feature_maps)
into per-channel statistics, fits one Gaussian per layer and statistic set on 10,000
training images (the same shrinkage as export), standardises the log Mahalanobis distances
on 2,000 others, and prints the AUROC of each layer alone, and of the served distance with
several gated sums of layers added, on the run's validation images against far-OOD sets
built from them (ood_sets.far_ood_sets, seed 1) and, for a run on a class subset, against
4,000 training images of the classes it never saw (open-set). The README's "Which layers"
figures come from it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _common import ROOT, add_json_argument, write_results

from center_embed import metrics, ood_sets
from center_embed.contract import distances
from center_embed.data import load_dataset, select_classes, split_validation

VARIANTS = {  # name -> (layers, statistics: m mean, s std, a mean absolute deviation)
    "layers 0-2, mean+std": ((0, 1, 2), "ms"),
    "layers 0-3, mean+std": ((0, 1, 2, 3), "ms"),
    "layers 0-1, mean+std": ((0, 1), "ms"),
    "layers 0-2, mean+std+abs dev (export's)": ((0, 1, 2), "msa"),
}


def statistics(model, preprocess, images: np.ndarray) -> dict[str, np.ndarray]:
    """{"L<l>_<stats>": (n, k) float64 for every layer and statistic set, "emb": (n, D)}."""
    import torch

    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1) * 255
    out: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for start in range(0, len(images), 500):
            x = torch.from_numpy(np.array(images[start : start + 500])).permute(0, 3, 1, 2)
            maps = model.feature_maps((x.float() - mean) / std)
            for layer, m in enumerate(maps):
                mu = m.mean((2, 3), keepdim=True)
                d = m - mu
                parts = {"m": mu.flatten(1), "s": d.pow(2).mean((2, 3)).sqrt(),
                         "a": d.abs().mean((2, 3))}  # fmt: skip
                for name in ("ms", "msa"):
                    stats = torch.cat([parts[c] for c in name], 1).numpy()
                    out.setdefault(f"L{layer}_{name}", []).append(stats)
            out.setdefault("emb", []).append(model.embed_maps(maps[-1]).numpy())
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


class Scorer:
    """One Gaussian per layer and statistic set, fitted on `fit`; log Mahalanobis distances
    standardised on `norm`; the served distance to `centers` beside them."""

    def __init__(self, fit: dict, norm: dict, centers: np.ndarray, quantile: float) -> None:
        from center_embed.export.atypicality import SHRINKAGE

        self.centers, self.quantile, self.gaussians = centers, quantile, {}
        for key, x in fit.items():
            if key != "emb":
                cov = np.cov(x, rowvar=False)
                cov += SHRINKAGE * np.trace(cov) / len(cov) * np.eye(len(cov))
                self.gaussians[key] = (x.mean(0), np.linalg.inv(cov))
        self.scale = {k: (v.mean(), v.std()) for k, v in self.scores(norm).items()}
        self.z_norm = self.standard(norm)

    def scores(self, f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = {k: np.log(np.einsum("ij,jk,ik->i", f[k] - mu, inv, f[k] - mu))
             for k, (mu, inv) in self.gaussians.items()}  # fmt: skip
        e = f["emb"].astype(np.float32)
        s["served"] = distances(e, self.centers, "squared_euclidean_minus_norm").min(1)
        return s

    def standard(self, f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: (v - self.scale[k][0]) / self.scale[k][1] for k, v in self.scores(f).items()}

    def gated(self, z: dict[str, np.ndarray], keys: list[str], gate: bool = True) -> np.ndarray:
        a = sum(z[k] for k in keys) / np.sqrt(len(keys))
        if not gate:  # the plain sum: every image's layer scores added to its distance
            return z["served"] + a
        reference = sum(self.z_norm[k] for k in keys) / np.sqrt(len(keys))
        return z["served"] + np.maximum(a - np.quantile(reference, self.quantile), 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a training run folder (its best.pt)")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10"))
    p.add_argument("--quantile", type=float, default=0.98)
    add_json_argument(p)
    args = p.parse_args()
    write_results("atypicality-layers", study(args), args.json)


def study(args) -> dict[str, dict[str, float]]:
    """score -> {set: AUROC of the validation images against it}, printed as a table."""
    from center_embed.training.checkpoint import Checkpoint

    ckpt = Checkpoint.load(Path(args.run) / "best.pt")
    model, criterion = ckpt.build_model()
    dataset = load_dataset(args.data)
    train, val = split_validation(select_classes(dataset, ckpt.class_names).train,
                                  ckpt.config.data.val_size, ckpt.config.data.seed)  # fmt: skip
    order = np.random.default_rng(0).permutation(len(train))
    fit = statistics(model, ckpt.preprocess, train.images[np.sort(order[2000:12000])])
    norm = statistics(model, ckpt.preprocess, train.images[np.sort(order[:2000])])
    scorer = Scorer(fit, norm, criterion.centers.float().numpy(), args.quantile)
    sets = ood_sets.far_ood_sets(val.images, 1000, seed=1)
    if len(ckpt.class_names) < len(dataset.class_names):
        known = [dataset.class_names.index(c) for c in ckpt.class_names]
        unseen = np.flatnonzero(~np.isin(dataset.train.labels, known))
        pick = np.sort(np.random.default_rng(0).permutation(unseen)[:4000])
        sets["open_set"] = dataset.train.images[pick]
    z_known = scorer.standard(statistics(model, ckpt.preprocess, val.images))
    z_sets = {n: scorer.standard(statistics(model, ckpt.preprocess, im)) for n, im in sets.items()}
    print(f"AUROC, validation images against each set ({args.run})")
    print("score".ljust(44) + "".join(n[:9].rjust(10) for n in sets))
    rows = {}

    def row(label: str, known: np.ndarray, other: dict[str, np.ndarray]) -> None:
        rows[label] = {n: metrics.auroc(known, other[n]) for n in sets}
        print(label[:44].ljust(44) + "".join(f"{v:10.3f}" for v in rows[label].values()))

    for key in [k for k in z_known if k.endswith("_ms")] + ["served"]:
        row(key, z_known[key], {n: z[key] for n, z in z_sets.items()})
    keys = ["L0_ms", "L1_ms", "L2_ms"]
    row("served + layers 0-2, mean+std, not gated", scorer.gated(z_known, keys, False),
        {n: scorer.gated(z, keys, False) for n, z in z_sets.items()})  # fmt: skip
    for name, (layers, stats) in VARIANTS.items():
        keys = [f"L{layer}_{stats}" for layer in layers]
        row(f"served + gated {name} (q {args.quantile})", scorer.gated(z_known, keys),
            {n: scorer.gated(z, keys) for n, z in z_sets.items()})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
