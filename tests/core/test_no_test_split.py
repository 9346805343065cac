"""A dataset without a test/ folder trains (no test evaluation, said in one line); the
tools that measure on the test split (eval, verify, --calibration-data) say they need one."""

from __future__ import annotations

import shutil

import pytest

from center_embed.cli import main
from center_embed.data import load_dataset
from center_embed.errors import UserError
from tests.helpers import write_image_folder


@pytest.fixture
def train_only(tmp_path):
    root = write_image_folder(tmp_path / "d", {"train": 8})
    assert not (root / "test").exists()
    return root


def test_a_folder_without_test_reads_with_an_empty_test_split(train_only, tmp_path):
    dataset = load_dataset(train_only, 32, tmp_path / "cache")
    assert len(dataset.train) == 24 and len(dataset.test) == 0
    assert dataset.test.images.shape == (0, 32, 32, 3)
    # Adding test/ later is seen (the cache key changes), not masked by the cached load.
    write_image_folder(train_only, {"test": 2})
    assert len(load_dataset(train_only, 32, tmp_path / "cache").test) == 6


def test_train_without_test_folder_then_eval_and_export(train_only, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", str(train_only), "--out", str(run)]
    sets = ["data.val_size=6", "train.batch_size=6", "train.epochs=1"]
    assert main([*args, *(a for s in sets for a in ("--set", s))]) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if line.startswith("no test split")]
    assert said == [f"no test split in {train_only} (no test/ folder): no test evaluation"]
    assert (run / "best.pt").exists() and not (run / "eval.json").exists()

    assert main(["eval", str(run / "best.pt")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "has no test split" in error and "eval" in error

    # export calibrates on the validation split, so it works; verify's test split does not exist
    model = tmp_path / "m.onnx"
    assert main(["export", str(run / "best.pt"), "--out", str(model)]) == 0
    capsys.readouterr()
    assert main(["verify", str(model)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: the test split of ") and "has no images" in error


def test_calibration_data_without_test_split_is_an_error(tiny_checkpoint, tiny_folder, tmp_path):
    from center_embed.export.onnx_export import export_checkpoint

    other = tmp_path / "other"
    shutil.copytree(tiny_folder / "train", other / "train")
    with pytest.raises(UserError, match=r"has no test split .*--calibration-data needs one"):
        export_checkpoint(tiny_checkpoint, tmp_path / "m.onnx", calibration_data=str(other))
