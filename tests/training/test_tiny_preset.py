"""The `tiny` preset learns something on small data with its own defaults (it used to
run 2 steps and stay at chance, or refuse data smaller than its batch)."""

from __future__ import annotations

from center_embed.training.config import load_config
from center_embed.training.evaluate import evaluate_checkpoint
from center_embed.training.train import train
from tests.helpers import write_image_folder


def test_tiny_preset_defaults_learn_on_sixty_images(tmp_path):
    root = write_image_folder(tmp_path / "d", {"train": 20, "test": 16}, seed=3)
    cfg = load_config("tiny", None, [f"data.path={root}"])  # the preset's defaults only
    assert cfg.train.batch_size <= 32 and cfg.train.epochs >= 20
    train(cfg, tmp_path / "run", log=lambda _: None)
    result = evaluate_checkpoint(tmp_path / "run" / "best.pt", device="cpu", tta=0)
    assert result["test_images"] == 48
    assert result["nearest_center_accuracy"] >= 0.9  # chance is 1/3
