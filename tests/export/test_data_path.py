"""A run records its dataset as an absolute path, so exporting from another directory
works; a dataset that moved is an error that names --data (each path tried said once)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from center_embed.errors import UserError
from center_embed.training.checkpoint import load_checkpoint
from tests.helpers import tiny_config, write_image_folder


def test_export_from_another_directory_and_after_the_data_moved(tmp_path, monkeypatch):
    from center_embed.export.onnx_export import export_checkpoint
    from center_embed.training.train import train

    monkeypatch.setenv("CENTER_EMBED_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path / "work" / "data", {"train": 8, "test": 2})
    monkeypatch.chdir(tmp_path / "work")
    cfg = tiny_config(Path("data"), train__epochs="1", data__val_size="6", train__batch_size="6")
    train(cfg, tmp_path / "run", log=lambda _: None)
    recorded = load_checkpoint(tmp_path / "run" / "best.pt")["data_source"]
    assert recorded == str((tmp_path / "work" / "data").resolve())

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    model = export_checkpoint(tmp_path / "run" / "best.pt", tmp_path / "m.onnx", verify=False)
    assert model.is_file()

    shutil.move(tmp_path / "work" / "data", tmp_path / "moved")
    with pytest.raises(UserError, match=r"pass its location with --data$") as caught:
        export_checkpoint(tmp_path / "run" / "best.pt", tmp_path / "m2.onnx", verify=False)
    assert str(caught.value).count(recorded) == 1
