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
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from center_embed import metrics, ood_sets  # noqa: E402
from center_embed.contract import distances  # noqa: E402
from center_embed.data import load_dataset, select_classes, split_validation  # noqa: E402
from center_embed.export.atypicality import SHRINKAGE  # noqa: E402
from center_embed.training.checkpoint import Checkpoint  # noqa: E402

VARIANTS = {  # name -> (layers, statistics: m mean, s std, a mean absolute deviation)
    "layers 0-2, mean+std": ((0, 1, 2), "ms"),
    "layers 0-3, mean+std": ((0, 1, 2, 3), "ms"),
    "layers 0-1, mean+std": ((0, 1), "ms"),
    "layers 0-2, mean+std+abs dev (export's)": ((0, 1, 2), "msa"),
}


@torch.no_grad()
def statistics(model, preprocess: dict, images: np.ndarray) -> dict[str, np.ndarray]:
    """{"L<l>_<stats>": (n, k) float64 for every layer and statistic set, "emb": (n, D)}."""
    mean = torch.tensor(preprocess["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(preprocess["std"]).view(1, 3, 1, 1) * 255
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), 500):
        x = torch.from_numpy(np.array(images[start : start + 500])).permute(0, 3, 1, 2)
        maps = model.feature_maps((x.float() - mean) / std)
        for layer, m in enumerate(maps):
            mu = m.mean((2, 3), keepdim=True)
            d = m - mu
            parts = {"m": mu.flatten(1), "s": d.pow(2).mean((2, 3)).sqrt(),
                     "a": d.abs().mean((2, 3))}  # fmt: skip
            for name in ("ms", "msa"):
                key = f"L{layer}_{name}"
                out.setdefault(key, []).append(torch.cat([parts[c] for c in name], 1).numpy())
        out.setdefault("emb", []).append(model.embed_maps(maps[-1]).numpy())
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a training run folder (its best.pt)")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10"))
    p.add_argument("--quantile", type=float, default=0.98)
    args = p.parse_args()
    ckpt = Checkpoint.load(Path(args.run) / "best.pt")
    model, criterion = ckpt.build_model()
    centers = criterion.centers.float().numpy()
    dataset = load_dataset(args.data)
    train, val = split_validation(select_classes(dataset, ckpt.class_names).train,
                                  ckpt.config.data.val_size, ckpt.config.data.seed)  # fmt: skip
    order = np.random.default_rng(0).permutation(len(train))
    fit = statistics(model, ckpt.preprocess, train.images[np.sort(order[2000:12000])])
    norm = statistics(model, ckpt.preprocess, train.images[np.sort(order[:2000])])
    gaussians = {}
    for key, x in fit.items():
        if key != "emb":
            cov = np.cov(x, rowvar=False)
            cov += SHRINKAGE * np.trace(cov) / len(cov) * np.eye(len(cov))
            gaussians[key] = (x.mean(0), np.linalg.inv(cov))

    def scores(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = {k: np.log(np.einsum("ij,jk,ik->i", f[k] - mu, inv, f[k] - mu))
             for k, (mu, inv) in gaussians.items()}  # fmt: skip
        e = f["emb"].astype(np.float32)
        s["served"] = distances(e, centers, "squared_euclidean_minus_norm").min(1)
        return s

    reference = scores(norm)
    scale = {k: (v.mean(), v.std()) for k, v in reference.items()}

    def standard(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: (v - scale[k][0]) / scale[k][1] for k, v in scores(f).items()}

    z_norm = standard(norm)

    def gated(z: dict[str, np.ndarray], keys: list[str], gate: bool = True) -> np.ndarray:
        a = sum(z[k] for k in keys) / np.sqrt(len(keys))
        if not gate:  # the plain sum: every image's layer scores added to its distance
            return z["served"] + a
        level = np.quantile(sum(z_norm[k] for k in keys) / np.sqrt(len(keys)), args.quantile)
        return z["served"] + np.maximum(a - level, 0)

    sets = ood_sets.far_ood_sets(val.images, 1000, seed=1)
    if len(ckpt.class_names) < len(dataset.class_names):
        known = [dataset.class_names.index(c) for c in ckpt.class_names]
        unseen = np.flatnonzero(~np.isin(dataset.train.labels, known))
        pick = np.sort(np.random.default_rng(0).permutation(unseen)[:4000])
        sets["open_set"] = dataset.train.images[pick]
    z_known = standard(statistics(model, ckpt.preprocess, val.images))
    z_sets = {n: standard(statistics(model, ckpt.preprocess, im)) for n, im in sets.items()}
    print(f"AUROC, validation images against each set ({args.run})")
    print("score".ljust(44) + "".join(n[:9].rjust(10) for n in sets))
    for key in [k for k in z_known if k.endswith("_ms")] + ["served"]:
        row = [metrics.auroc(z_known[key], z_sets[n][key]) for n in sets]
        print(key.ljust(44) + "".join(f"{v:10.3f}" for v in row))
    keys = ["L0_ms", "L1_ms", "L2_ms"]
    row = [metrics.auroc(gated(z_known, keys, False), gated(z_sets[n], keys, False)) for n in sets]
    print("served + layers 0-2, mean+std, not gated".ljust(44) + "".join(f"{v:10.3f}" for v in row))
    for name, (layers, stats) in VARIANTS.items():
        keys = [f"L{layer}_{stats}" for layer in layers]
        row = [metrics.auroc(gated(z_known, keys), gated(z_sets[n], keys)) for n in sets]
        label = f"served + gated {name} (q {args.quantile})"
        print(label[:44].ljust(44) + "".join(f"{v:10.3f}" for v in row))


if __name__ == "__main__":
    main()
