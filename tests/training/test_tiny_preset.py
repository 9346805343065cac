"""The `tiny` preset learns something on small data with its own defaults (it used to
run 2 steps and stay at chance, or refuse data smaller than its batch), says what it is
about to do, and its run exports as it is (it holds out a share for calibration)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from center_embed.data import validation_count
from center_embed.errors import UserError
from center_embed.training import train as train_module
from center_embed.training.config import Config, load_config
from center_embed.training.evaluate import evaluate_checkpoint
from center_embed.training.train import banner, format_duration, train
from tests.helpers import write_image_folder


def test_tiny_preset_defaults_learn_and_export_on_sixty_images(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "d", {"train": 20, "test": 16}, seed=3)
    cfg = load_config("tiny", None, [f"data.path={root}"])  # the preset's defaults only
    assert cfg.train.batch_size <= 32 and cfg.train.epochs >= 20
    monkeypatch.setitem(train_module.PRESET_MAX_TRAIN_IMAGES, "tiny", 40)  # 54 > 40
    lines: list[str] = []
    train(cfg, tmp_path / "run", log=lines.append, preset="tiny")
    # The banner: data, split sizes (a tenth of 60 held out), schedule, device, output.
    assert lines[0] == f"data      {root}"
    assert lines[1] == "images    54 train, 6 validation, 48 test; 3 classes"
    assert lines[2] == "schedule  20 epochs x 1 steps of 32 images = 20 steps"
    assert lines[3].startswith("device    cpu (")
    assert lines[4] == f"output    {tmp_path / 'run'}"
    assert lines[5].startswith("note      the tiny preset is meant for small data (up to 40")
    assert sum(line.startswith("about ") and "of training to go" in line for line in lines) == 1
    result = evaluate_checkpoint(tmp_path / "run" / "best.pt", device="cpu", tta=0)
    assert result["test_images"] == 48
    assert result["nearest_center_accuracy"] >= 0.9  # chance is 1/3

    from center_embed.export.onnx_export import export_checkpoint
    from center_embed.runtime import OnnxModel

    model = OnnxModel(export_checkpoint(tmp_path / "run" / "best.pt", tmp_path / "m.onnx"))
    calibration = json.loads(model.info.metadata["center_embed.unknown_threshold_calibration"])
    assert calibration["split"] == "validation" and calibration["images"] == 6


def test_the_banner_names_a_data_path_the_user_did_not_give(tmp_path):
    cfg = Config()  # data.path: the default
    data = SimpleNamespace(
        loader=SimpleNamespace(labels=[0] * 45_000), val=[0] * 5_000, test_images=10_000,
        source=cfg.data.path, class_names=list("abcdefghij"),
    )  # fmt: skip
    run = SimpleNamespace(
        cfg=cfg, data=data, total_steps=31_240, steps_per_epoch=1_562, device="cpu", bf16=False,
        out=tmp_path, ctx=SimpleNamespace(world_size=1),
    )  # fmt: skip
    lines = banner(run, preset="tiny", default_data=True)
    assert "(the default data.path, relative to this folder; --data names another)" in lines[0]
    assert banner(run, default_data=False)[0] == f"data      {cfg.data.path}"  # given by the user
    assert lines[1] == "images    45,000 train, 5,000 validation, 10,000 test; 10 classes"
    assert "not 45,000" in lines[-1] and "--preset cpu" in lines[-1]
    assert not any(line.startswith("note") for line in banner(run, preset="cpu"))


def test_val_size_is_a_count_or_a_share():
    assert validation_count(0.1, 180) == 18
    assert validation_count(0.001, 50) == 1  # a share above 0 holds out at least one
    assert validation_count(48, 180) == 48 and validation_count(0, 180) == 0
    for bad in (180, 2.5, -1):
        with pytest.raises(UserError, match="share in \\(0, 1\\) or a whole count"):
            validation_count(bad, 180)


def test_durations_read_as_a_person_writes_them():
    assert [format_duration(s) for s in (4.4, 65, 7_800)] == ["4 s", "1 min 05 s", "2 h 10 min"]
