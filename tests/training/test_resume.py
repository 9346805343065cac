"""Interrupt and resume: a run stopped by a signal and resumed ends bit for bit where an
uninterrupted run ends (weights, centers, optimizer, EMA, validation figures)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from center_embed.errors import UserError
from center_embed.training import train as train_module
from center_embed.training.checkpoint import load_checkpoint
from center_embed.training.train import TrainingInterrupted, train
from tests.helpers import ROOT, tiny_config

STEPS_PER_EPOCH = 4  # tiny_config: 144 training images, batches of 32
STATE_KEYS = ("model", "center_loss", "ema")


def quiet(_: str) -> None:
    pass


def assert_same_state(a: dict, b: dict) -> None:
    """Every tensor of the model, the centers, the EMA and the optimizer state is equal."""
    assert a["step"] == b["step"]
    for key in STATE_KEYS:
        assert a[key].keys() == b[key].keys(), key
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][index][name]), f"optimizer {index}.{name}"


def val_figures(ckpt: dict) -> list[dict]:
    return [record.get("val") for record in ckpt["metrics"]["history"]]


@pytest.fixture(scope="module")
def straight_runs(tiny_folder, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs, one per update rule."""
    runs = {}
    cache = tmp_path_factory.mktemp("cache")  # module scope: set before the autouse cache
    for update in ("paper", "mean", "sgd"):
        out = tmp_path_factory.mktemp(f"straight-{update}")
        cfg = tiny_config(tiny_folder, loss__update=update, data__cache_dir=str(cache))
        train(cfg, out, log=quiet)
        runs[update] = out
    return runs


def signal_at(monkeypatch, step: int, signum: int) -> None:
    """Send ourselves `signum` once, during optimizer step `step` (0-based)."""
    real = train_module.center_weight_at
    sent = []

    def patched(at: int, steps_per_epoch: int, cfg) -> float:
        if at == step and not sent:
            sent.append(at)
            os.kill(os.getpid(), signum)
        return real(at, steps_per_epoch, cfg)

    monkeypatch.setattr(train_module, "center_weight_at", patched)


@pytest.mark.parametrize(
    ("update", "signal_step", "signum", "stopped_at"),
    [
        ("paper", 5, signal.SIGINT, 6),  # mid-epoch, just after an EMA step
        ("mean", 2, signal.SIGTERM, 3),  # mid-epoch, first epoch
        ("sgd", 7, signal.SIGINT, 8),  # the epoch's last step: stops after its validation
    ],
)
def test_interrupted_and_resumed_equals_uninterrupted(
    tiny_folder, tmp_path, monkeypatch, straight_runs, update, signal_step, signum, stopped_at
):
    cfg = tiny_config(tiny_folder, loss__update=update)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal_at(monkeypatch, signal_step, signum)
    with pytest.raises(TrainingInterrupted, match=f"--resume {tmp_path}") as info:
        train(cfg, tmp_path, log=quiet)
    assert f"interrupted at step {stopped_at}/12" in str(info.value)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["step"] == stopped_at
    assert saved["epoch"] == pytest.approx(stopped_at / STEPS_PER_EPOCH)
    # Only whole epochs were validated and logged.
    assert len(saved["metrics"]["history"]) == stopped_at // STEPS_PER_EPOCH
    assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()

    logged = []
    train(cfg, tmp_path, resume=True, log=logged.append)
    assert f"resumed {tmp_path / 'last.pt'} at step {stopped_at}/12" in logged
    resumed = load_checkpoint(tmp_path / "last.pt")
    straight = load_checkpoint(straight_runs[update] / "last.pt")
    assert_same_state(resumed, straight)
    assert val_figures(resumed) == val_figures(straight)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3  # one per epoch
    best_a = load_checkpoint(tmp_path / "best.pt")
    best_b = load_checkpoint(straight_runs[update] / "best.pt")
    assert best_a["step"] == best_b["step"]
    assert torch.equal(best_a["center_loss"]["centers"], best_b["center_loss"]["centers"])


def test_resume_uses_the_stored_config_and_a_finished_run_stays_finished(
    tiny_folder, tmp_path, straight_runs
):
    # A different option on the command line does not change a resumed run.
    other = tiny_config(tiny_folder, loss__update="paper", train__epochs="7")
    (tmp_path / "last.pt").write_bytes((straight_runs["paper"] / "last.pt").read_bytes())
    logged = []
    train(other, tmp_path, resume=True, log=logged.append)
    assert f"resuming with the config stored in {tmp_path / 'last.pt'}" in logged
    after = load_checkpoint(tmp_path / "last.pt")
    assert after["step"] == 12 and after["config"]["train"]["epochs"] == 3.0
    assert_same_state(after, load_checkpoint(straight_runs["paper"] / "last.pt"))


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tiny_folder, tmp_path, monkeypatch):
    real = train_module.center_weight_at

    def patched(at: int, steps_per_epoch: int, cfg) -> float:
        if at == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(at, steps_per_epoch, cfg)

    monkeypatch.setattr(train_module, "center_weight_at", patched)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_folder), tmp_path, log=quiet)
    assert list(tmp_path.iterdir()) == []  # mid-way through epoch 1: nothing saved yet
    assert signal.getsignal(signal.SIGINT) is handler


def test_resume_without_a_checkpoint_is_a_user_error(tiny_folder, tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        train(tiny_config(tiny_folder), tmp_path, resume=True, log=quiet)


def test_sigint_from_outside_then_resume_from_the_command_line(tiny_folder, tmp_path):
    """The real thing: a process, Ctrl-C at an arbitrary moment, exit 130, resume, same end."""
    common = [
        "--preset", "tiny", "--data", str(tiny_folder), "--no-eval",
        "--set", "data.val_size=48", "--set", "train.batch_size=32",
        "--set", "train.epochs=24", "--set", "train.threads=1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "center_embed.cli", "train"]
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [*cmd, *common, "--out", str(run)], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (run / "metrics.jsonl").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "training never logged an epoch"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"Continue with: center-embed train --resume {run}" in stderr
    stopped = load_checkpoint(run / "last.pt")["step"]
    assert 0 < stopped < 96

    resumed = subprocess.run(
        [*cmd, "--resume", str(run), "--no-eval"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {run / 'last.pt'} at step {stopped}/96" in resumed.stdout

    straight = tmp_path / "straight"
    done = subprocess.run(
        [*cmd, *common, "--out", str(straight)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same_state(load_checkpoint(run / "last.pt"), load_checkpoint(straight / "last.pt"))
