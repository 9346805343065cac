"""Config: presets, TOML files and --set overrides, each checked and typed."""

from __future__ import annotations

import pytest

from center_embed.errors import UserError
from center_embed.training.config import PRESETS, Config, load_config


def test_layers_apply_in_order(tmp_path):
    toml = tmp_path / "my.toml"
    toml.write_text('[loss]\ncenter_weight = 0.05\nupdate = "mean"\n[train]\nepochs = 4\n')
    cfg = load_config("cpu", str(toml), ["loss.center_weight=0.01", "model.widths=8,16,32"])
    assert cfg.loss.center_weight == 0.01  # --set beats the file
    assert cfg.loss.update == "mean"
    assert cfg.train.epochs == 4.0 and isinstance(cfg.train.epochs, float)
    assert cfg.model.widths == [8, 16, 32]
    assert cfg.train.batch_size == PRESETS["cpu"]["train"]["batch_size"]


def test_round_trip_through_dict():
    cfg = load_config("tiny", None, ["data.classes=a,b", "train.compile=true"])
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg and again.data.classes == ["a", "b"] and again.train.compile is True


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("loss.nope=1", "unknown option 'loss.nope'"),
        ("bogus.x=1", "unknown option 'bogus.x'"),
        ("train.epochs=many", "train.epochs expects float"),
        ("train.compile=maybe", "train.compile expects bool"),
        ("loss.update=adam", "loss.update must be paper, mean or sgd"),
        ("loss.alpha=0", r"loss.alpha must be in \(0, 1\]"),
        ("center_weight", "expects section.key=value"),
    ],
)
def test_bad_options_are_one_line_errors(item, message):
    with pytest.raises(UserError, match=message):
        load_config(None, None, [item])


def test_bad_files_and_presets(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(None, str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[loss\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(None, str(bad))
    with pytest.raises(UserError, match="unknown preset"):
        load_config("huge")


def test_a_config_saved_before_embedding_norm_builds_the_old_network():
    saved = Config().to_dict()
    del saved["model"]["embedding_norm"]  # what checkpoints before the option hold
    assert Config.from_dict(saved).model.embedding_norm == "none"
    assert Config().model.embedding_norm == "rms"  # new runs
    with pytest.raises(UserError, match="model.embedding_norm must be batchnorm, rms or none"):
        load_config(None, None, ["model.embedding_norm=layer"])
