"""One overwrite rule for every writer (an existing output is an error unless --overwrite),
a failed report leaves no folder, and `serve` on a taken port is one error line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from center_embed.cli import main
from tests.helpers import ROOT


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_export_refuses_an_existing_out_unless_overwrite(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"an older model")
    assert main(["export", str(tiny_checkpoint), "--out", str(out), "--no-verify"]) == 1
    assert one_error_line(capsys) == f"error: {out} exists; pass --overwrite to replace it"
    assert out.read_bytes() == b"an older model"
    args = ["export", str(tiny_checkpoint), "--out", str(out), "--no-verify", "--overwrite"]
    assert main(args) == 0
    assert out.stat().st_size > 10_000  # the new model replaced the old bytes
    printed = capsys.readouterr().out
    assert "3 classes" in printed and " kB" in printed and "0.0 MB" not in printed


@pytest.mark.parametrize(
    ("argv", "existing"),
    [
        (["eval", "{ckpt}", "--out", "{tmp}/e.json"], "e.json"),
        (["verify", "{onnx}", "--data", "{data}", "--json", "{tmp}/v.json"], "v.json"),
        (["triton", "{onnx}", "--out", "{tmp}/repo"], "repo/center_embed"),
        (["report", "{onnx}", "--data", "{data}", "--out", "{tmp}/rep"], "rep"),
    ],
)
def test_every_writer_refuses_an_existing_output(
    tiny_checkpoint, tiny_onnx, tiny_folder, tmp_path, capsys, argv, existing
):
    target = tmp_path / existing
    target.mkdir(parents=True) if "." not in existing else target.write_text("{}")
    fill = {"ckpt": tiny_checkpoint, "onnx": tiny_onnx, "data": tiny_folder, "tmp": tmp_path}
    assert main([a.format(**fill) for a in argv]) == 1
    assert one_error_line(capsys) == f"error: {target} exists; pass --overwrite to replace it"


def test_report_overwrites_only_a_report_and_a_failure_leaves_no_folder(
    tiny_onnx, tiny_folder, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "rep"
    argv = ["report", str(tiny_onnx), "--data", str(tiny_folder), "--out", str(out)]
    assert main([*argv, "--max-points", "20"]) == 0
    first = json.loads((out / "metrics.json").read_text())
    assert main([*argv, "--overwrite", "--max-points", "20"]) == 0
    assert json.loads((out / "metrics.json").read_text())["onnx"] == first["onnx"]

    not_a_report = tmp_path / "mine"
    not_a_report.mkdir()
    capsys.readouterr()
    assert main([*argv[:-1], str(not_a_report), "--overwrite"]) == 1
    assert "is not a report folder" in one_error_line(capsys)

    from center_embed.report import plots

    def broken_plot(*args, **kwargs):
        raise RuntimeError("a plotting failure")

    monkeypatch.setattr(plots, "plot_confusion", broken_plot)
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="a plotting failure"):
        main([*argv[:-1], str(fresh)])
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "rep"]  # no temporary left


def test_verify_shows_progress(tiny_onnx, tiny_folder, capsys):
    assert main(["verify", str(tiny_onnx), "--data", str(tiny_folder)]) == 0
    err = capsys.readouterr().err
    assert "verify:" in err and "/48 [" in err  # a bar over the 48 test images


def test_serve_on_a_taken_port_is_one_error_line_before_any_banner(tiny_onnx):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "center_embed.cli", "serve", str(tiny_onnx),
             "--port", str(port)],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    assert result.stderr.count("\n") == 1 and "serving" not in result.stderr
