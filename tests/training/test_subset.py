"""--classes: train and evaluate on the named classes only; the checkpoint records which."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from center_embed.cli import main
from center_embed.data import load_dataset, select_classes
from center_embed.errors import UserError
from center_embed.training.checkpoint import build_model, load_checkpoint
from center_embed.training.evaluate import evaluate_checkpoint
from center_embed.training.inference import embed_images
from center_embed.training.train import train
from tests.helpers import tiny_config, write_image_folder


def test_subset_run_trains_evaluates_and_records_its_classes(tiny_folder, tmp_path):
    # Listed out of alphabetical order: label i is the i-th class named.
    cfg = tiny_config(tiny_folder, data__classes="red,blue", data__val_size="16", train__epochs="5")
    result = train(cfg, tmp_path, log=lambda _: None)
    assert result["val"]["nearest_center_accuracy"] >= 0.9

    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["class_names"] == ["red", "blue"]
    assert ckpt["config"]["data"]["classes"] == ["red", "blue"]
    model, criterion, _ = build_model(ckpt)
    assert criterion.centers.shape == (2, cfg.model.embedding_dim)
    assert model.classifier.weight.shape == (2, cfg.model.embedding_dim)

    evaluation = evaluate_checkpoint(tmp_path / "best.pt", bf16="off")
    assert evaluation["test_images"] == 32  # 16 red + 16 blue; green never seen
    assert evaluation["nearest_center_accuracy"] >= 0.9

    # Label 0 is red: those images are bright in the red channel (conftest's tiny images).
    subset = select_classes(load_dataset(tiny_folder), ["red", "blue"])
    red = subset.test.images[subset.test.labels == 0].reshape(-1, 3).mean(0)
    blue = subset.test.images[subset.test.labels == 1].reshape(-1, 3).mean(0)
    assert red[0] > red[2] + 80 and blue[2] > blue[0] + 80

    # The held-out class lies farther from the centers than the known ones: what open-set
    # studies measure.
    full = load_dataset(tiny_folder)
    green = full.test.images[full.test.labels == full.class_names.index("green")]
    known_min = min_distances(model, ckpt, subset.test.images, criterion.centers)
    green_min = min_distances(model, ckpt, green, criterion.centers)
    assert green_min.shape == (16,) and known_min.shape == (32,)
    assert green_min.median() > known_min.median()


def min_distances(model, ckpt, images: np.ndarray, centers: torch.Tensor) -> torch.Tensor:
    prep = ckpt["preprocess"]
    e = embed_images(model, images, prep["mean"], prep["std"], torch.device("cpu"))  # (N, D)
    return torch.cdist(e, centers).min(dim=1).values


def test_subset_from_the_command_line(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", str(tiny_folder), "--out", str(out)]
    sets = ["--set", "data.val_size=16", "--set", "train.batch_size=32", "--set", "train.epochs=3"]
    assert main([*args, *sets, "--classes", " blue , green "]) == 0
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["test_images"] == 32
    assert load_checkpoint(out / "best.pt")["class_names"] == ["blue", "green"]
    capsys.readouterr()


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ("purple,red", "unknown classes ['purple']; the dataset has ['blue', 'green', 'red']"),
        ("red,red", "classes listed twice in ['red', 'red']"),
        ("red", "a class subset needs at least two classes, got ['red']"),
        (" , ", "--classes expects comma-separated class names"),
        ("Red,blue", "unknown classes ['Red']"),  # names are case-sensitive
    ],
)
def test_bad_class_lists_are_one_line_errors(tiny_folder, tmp_path, capsys, classes, message):
    args = ["train", "--preset", "tiny", "--data", str(tiny_folder), "--out", str(tmp_path)]
    assert main([*args, "--classes", classes]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "last.pt").exists()


def test_evaluating_a_subset_model_on_data_without_its_classes(tiny_folder, tmp_path):
    cfg = tiny_config(tiny_folder, data__classes="red,blue", train__epochs="1")
    train(cfg, tmp_path / "run", log=lambda _: None)
    other = write_image_folder(tmp_path / "other", {"train": 2, "test": 2}, ["red", "green"])
    with pytest.raises(UserError, match=r"lacks the model's classes \['blue'\]"):
        evaluate_checkpoint(tmp_path / "run" / "best.pt", data=str(other))
    # The full dataset is fine: the checkpoint's subset is applied to it.
    assert evaluate_checkpoint(tmp_path / "run" / "best.pt", bf16="off")["test_images"] == 32
    assert np.array_equal(
        load_checkpoint(tmp_path / "run" / "best.pt")["config"]["data"]["classes"], ["red", "blue"]
    )
