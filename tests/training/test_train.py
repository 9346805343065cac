"""A short training run end to end: the loss falls, checkpoints reload, bad input is named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from center_embed.data import load_for_classes
from center_embed.errors import UserError
from center_embed.training.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    Preprocess,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from center_embed.training.evaluate import evaluate_checkpoint
from center_embed.training.inference import embed_images
from center_embed.training.train import jigsaw, train
from tests.helpers import tiny_config


@pytest.mark.parametrize("update", ["paper", "mean", "sgd"])
def test_short_run_learns_and_checkpoint_reloads(tiny_folder, tmp_path, update):
    cfg = tiny_config(tiny_folder, loss__update=update, train__epochs="4")
    result = train(cfg, tmp_path, log=lambda _: None)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 4
    assert history[-1]["train_ce"] < history[0]["train_ce"]
    assert result["val"]["nearest_center_accuracy"] >= 0.9  # three easy classes

    # weights_only=True: plain types and tensors only.
    raw = torch.load(tmp_path / "best.pt", weights_only=True)
    assert raw["format_version"] == CHECKPOINT_FORMAT_VERSION
    assert raw["class_names"] == ["blue", "green", "red"]
    assert raw["config"]["loss"]["update"] == update
    model, criterion, _ = build_model(load_checkpoint(tmp_path / "best.pt"))
    assert torch.equal(criterion.centers, raw["center_loss"]["centers"])
    e = model.embed(torch.zeros(2, 3, 32, 32))
    assert e.shape == (2, cfg.model.embedding_dim) and torch.isfinite(e).all()


def test_eval_reports_every_metric(tiny_checkpoint):
    result = evaluate_checkpoint(tiny_checkpoint, tta=1, bf16="off")
    for key in ("nearest_center_accuracy", "precision_at_1"):
        assert 0.9 <= result[key] <= 1.0, key
    # The classifier head lags the centers in this 18-step run with the RMS-normalised
    # embedding (measured 0.875 softmax against 1.0 nearest-center; 0.979 without the
    # norm); on CIFAR-10 the two agree within 0.1 point (docs/benchmarks.md).
    assert 0.8 <= result["softmax_accuracy"] <= 1.0
    assert 0.7 <= result["map_at_r"] <= result["precision_at_1"]
    assert 0 < result["intra_inter_ratio"] < 1
    assert result["test_images"] == 48 and result["tta"]["level"] == 1


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_folder, tmp_path):
    train(tiny_config(tiny_folder, train__epochs="1"), tmp_path / "ok", log=lambda _: None)
    good = (tmp_path / "ok" / "last.pt").read_bytes()
    with pytest.raises(UserError, match="NaN or infinite"):
        train(tiny_config(tiny_folder, train__lr="1e30"), tmp_path / "nan", log=lambda _: None)
    assert not (tmp_path / "nan" / "last.pt").exists()  # nothing half-trained was saved
    assert (tmp_path / "ok" / "last.pt").read_bytes() == good


def test_refuses_to_overwrite_a_run(tiny_folder, tmp_path):
    (tmp_path / "last.pt").write_bytes(b"precious")
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny_config(tiny_folder), tmp_path, log=lambda _: None)
    assert (tmp_path / "last.pt").read_bytes() == b"precious"


def test_checkpoint_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt["format_version"] = CHECKPOINT_FORMAT_VERSION + 1
    save_checkpoint(tmp_path / "future.pt", ckpt)
    with pytest.raises(UserError, match=f"format version {CHECKPOINT_FORMAT_VERSION + 1}"):
        load_checkpoint(tmp_path / "future.pt")


def test_sgd_rule_with_center_loss_off(tiny_folder, tmp_path):
    """λ = 0 leaves the sgd centers' gradient at zero; it must not be divided by λ."""
    cfg = tiny_config(tiny_folder, loss__update="sgd", loss__center_weight="0", train__epochs="1")
    result = train(cfg, tmp_path, log=lambda _: None)
    assert torch.isfinite(torch.tensor(result["history"][-1]["train_ce"]))
    centers = torch.load(tmp_path / "last.pt", weights_only=True)["center_loss"]["centers"]
    assert torch.isfinite(centers).all()


def test_best_checkpoint_gets_the_mode_of_the_last(tiny_checkpoint):
    """best.pt is a copy of last.pt (atomic_copy), written with the same ordinary
    permissions as last.pt (save_checkpoint), not a temporary file's 0600."""
    run = tiny_checkpoint.parent
    assert oct((run / "last.pt").stat().st_mode & 0o777) == oct(
        (run / "best.pt").stat().st_mode & 0o777
    )


def test_lookahead_decay_follows_ema_every():
    """0.95 per step, compounded over the `ema_every` steps between updates; ramped in."""
    from center_embed.training.train import Lookahead

    net = torch.nn.Linear(2, 2)
    assert Lookahead(net, 100, every=5).decay(100) == pytest.approx(0.95**5)
    assert Lookahead(net, 100, every=3).decay(100) == pytest.approx(0.95**3)
    assert Lookahead(net, 100, every=3).decay(50) == pytest.approx(0.95**3 / 8)


def test_compile_is_for_cuda_only():
    """train.compile leaves the CPU forward as it is (inductor there needs a C++ toolchain)."""
    from center_embed.training.distributed import Context
    from center_embed.training.train import training_forward

    net = torch.nn.Linear(2, 2)
    assert training_forward(net, Context(), True, torch.device("cpu")) is net


@pytest.mark.gpu
def test_compiled_training_on_cuda_learns(tiny_folder, tmp_path):
    from center_embed.training.distributed import Context
    from center_embed.training.train import training_forward

    cuda = torch.device("cuda")
    assert hasattr(
        training_forward(torch.nn.Linear(2, 2).cuda(), Context(), True, cuda), "_orig_mod"
    )
    cfg = tiny_config(tiny_folder, train__device="cuda", train__compile="true", train__epochs="4")
    result = train(cfg, tmp_path, log=lambda _: None)
    assert result["val"]["nearest_center_accuracy"] >= 0.9


def test_jigsaw_shuffles_each_images_own_patches():
    from center_embed.training.train import jigsaw

    torch.manual_seed(0)
    x = torch.randn(3, 3, 34, 33)  # not a multiple of the grid: the rest is left as it is
    y = jigsaw(x, grid=4)
    assert y.shape == x.shape and torch.equal(y[:, :, 32:], x[:, :, 32:])
    assert torch.equal(y[..., 32:], x[..., 32:])

    def patches(t):  # (n, 16, 3*8*8)
        return (
            t[:, :, :32, :32].reshape(3, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(3, 16, -1)
        )

    px, py = patches(x), patches(y)
    for i in range(3):  # every patch of y is a patch of the same image of x, each used once
        match = (py[i][:, None] == px[i][None]).all(-1)  # (16, 16)
        assert match.sum(1).eq(1).all() and match.sum(0).eq(1).all()
    assert not torch.equal(y, x)


def jigsaw_uniform_kl(checkpoint: Path, images: np.ndarray) -> float:
    """Mean KL(uniform || softmax) of the checkpoint's head on `images`: the outlier
    exposure term (cross-entropy to the uniform distribution) less its floor, ln C."""
    ckpt = load_checkpoint(checkpoint)
    model, _, _ = build_model(ckpt)
    preprocess = Preprocess.from_dict(ckpt["preprocess"])
    e = embed_images(model, images, preprocess.mean, preprocess.std, torch.device("cpu"))
    with torch.no_grad():
        logits = model.head(e)
    uniform_ce = (logits.logsumexp(1) - logits.mean(1)).mean().item()
    return uniform_ce - math.log(logits.shape[1])


def test_outlier_exposure_pushes_jigsaws_toward_uniform(tiny_folder, tiny_checkpoint, tmp_path):
    """loss.outlier_weight adds the cross-entropy of jigsaw outliers to the uniform
    distribution: against the same run without it (the session's tiny checkpoint: the same
    config but for outlier_weight), the trained head is closer to uniform on jigsaws of the
    test images. Training on the CPU is deterministic, so a term that is never added gives
    the very same model, and a term of the wrong sign a larger KL: either fails."""
    cfg = tiny_config(tiny_folder, loss__outlier_weight="0.5", train__epochs="3")
    train(cfg, tmp_path, log=lambda _: None)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_ce"] < history[0]["train_ce"]
    raw = torch.load(tmp_path / "best.pt", weights_only=True)
    assert raw["config"]["loss"]["outlier_weight"] == 0.5
    with pytest.raises(UserError, match="outlier_fraction"):
        tiny_config(tiny_folder, loss__outlier_fraction="0").validate()

    plain = tiny_checkpoint.parent / "last.pt"  # both after the same steps
    plain_config = torch.load(plain, weights_only=True)["config"]
    assert plain_config["loss"]["outlier_weight"] == 0
    exposed_loss = {**plain_config["loss"], "outlier_weight": 0.5}
    assert {**plain_config, "loss": exposed_loss} == raw["config"]  # nothing else differs
    test = load_for_classes(tiny_folder, raw["class_names"], cfg.data.image_size).test
    with torch.random.fork_rng():  # the same jigsaws for both models
        torch.manual_seed(0)
        pixels = torch.from_numpy(test.images.copy()).permute(0, 3, 1, 2)
        jigsaws = jigsaw(pixels).permute(0, 2, 3, 1).contiguous().numpy()
    exposed = jigsaw_uniform_kl(tmp_path / "last.pt", jigsaws)
    assert 0 < exposed < jigsaw_uniform_kl(plain, jigsaws)


def test_a_run_stuck_at_chance_is_called_out():
    from center_embed.training.train import not_learning

    assert not_learning(1.80, 6, 1) is None  # the first epoch may still be at chance
    assert not_learning(1.70, 6, 4) is None  # below ln 6 = 1.792: learning
    warning = not_learning(1.87, 6, 4)  # the 6-class cpu-preset run's fourth epoch
    assert warning.startswith("warning:") and "ln 6 = 1.792" in warning
