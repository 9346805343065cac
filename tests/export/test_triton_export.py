"""The Triton model repository writer: config.pbtxt parsed with the ModelConfig protobuf that
tritonclient[grpc] ships, checked field by field against the ONNX file it describes.

(Triton itself cannot run on these machines; this is as close as a test here gets.)
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from center_embed.cli import main
from center_embed.errors import UserError
from center_embed.export.triton import TritonOptions, write_triton_repository
from center_embed.fileio import sha256_file

# ONNX element type -> Triton data type, written out here rather than taken from the code.
TRITON_TYPES = {
    onnx.TensorProto.UINT8: mc.TYPE_UINT8,
    onnx.TensorProto.FLOAT: mc.TYPE_FP32,
    onnx.TensorProto.INT64: mc.TYPE_INT64,
}


def parse_config(folder: Path) -> mc.ModelConfig:
    """Strict: text_format.Parse refuses any field ModelConfig does not have."""
    return text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())


def onnx_tensors(path: Path) -> dict[str, tuple[int, list]]:
    graph = onnx.load(str(path)).graph
    return {
        v.name: (
            v.type.tensor_type.elem_type,
            [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        )
        for v in [*graph.input, *graph.output]
    }


def check_tensor(declared, onnx_type: int, onnx_shape: list) -> None:
    """Triton owns the batch dim: dims are the ONNX shape without N; an [N] tensor is
    dims [1] reshaped to []."""
    assert isinstance(onnx_shape[0], str), "the ONNX batch dimension is symbolic"
    assert declared.data_type == TRITON_TYPES[onnx_type], declared.name
    if len(onnx_shape) == 1:
        assert list(declared.dims) == [1] and declared.HasField("reshape"), declared.name
        assert list(declared.reshape.shape) == []
    else:
        assert list(declared.dims) == onnx_shape[1:], declared.name
        assert not declared.HasField("reshape")


def test_repository_matches_the_onnx_file(tiny_onnx, tmp_path):
    folder = write_triton_repository(tiny_onnx, tmp_path / "repo")
    assert folder == tmp_path / "repo" / "center_embed"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "1",
        "1/model.onnx",
        "config.pbtxt",
    ]
    assert sha256_file(folder / "1" / "model.onnx") == sha256_file(tiny_onnx)
    config = parse_config(folder)
    assert config.name == "center_embed"
    assert (config.backend, config.platform) == ("onnxruntime", "onnxruntime_onnx")
    assert config.default_model_filename == "model.onnx"
    assert config.max_batch_size == 64
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (1, mc.ModelInstanceGroup.KIND_CPU)
    ]
    assert not config.HasField("optimization")

    tensors = onnx_tensors(tiny_onnx)
    assert [t.name for t in config.input] == ["images"]
    assert config.input[0].format == mc.ModelInput.FORMAT_NHWC
    assert [t.name for t in config.output] == [
        "embeddings", "distances", "labels", "min_distances", "unknown_scores", "atypicality",
    ]  # fmt: skip
    assert len(tensors) == 7  # one input, six outputs: nothing left undeclared
    for declared in [*config.input, *config.output]:
        check_tensor(declared, *tensors[declared.name])
    assert list(config.input[0].dims) == [32, 32, 3]  # the tiny model's input size


def test_a_format_1_file_declares_its_four_outputs(tiny_plain_onnx, tmp_path):
    config = parse_config(write_triton_repository(tiny_plain_onnx, tmp_path / "repo"))
    assert [t.name for t in config.output] == ["embeddings", "distances", "labels",
                                               "min_distances"]  # fmt: skip


def test_gpu_instances_and_tensorrt(tiny_onnx, tmp_path):
    options = TritonOptions(max_batch_size=16, instances=2, device="gpu", tensorrt="fp16")
    config = parse_config(write_triton_repository(tiny_onnx, tmp_path, options))
    assert config.max_batch_size == 16
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (2, mc.ModelInstanceGroup.KIND_GPU)
    ]
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {
        "precision_mode": "FP16",
        "max_workspace_size_bytes": str(1 << 30),
    }


def test_refusals(tiny_onnx, tmp_path):
    with pytest.raises(UserError, match="runs on GPU instances"):
        write_triton_repository(tiny_onnx, tmp_path, TritonOptions(tensorrt="fp32"))
    with pytest.raises(UserError, match="at least 1"):
        write_triton_repository(tiny_onnx, tmp_path, TritonOptions(max_batch_size=0))
    other = tmp_path / "other.onnx"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph), other)
    with pytest.raises(UserError, match="not exported by center-embed"):
        write_triton_repository(other, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()  # nothing written for a refused model


def test_cli_triton_and_export_flag(tiny_onnx, tiny_checkpoint, tmp_path, capsys):
    assert main(["triton", str(tiny_onnx), "--out", str(tmp_path / "a"), "--triton-gpu"]) == 0
    config = parse_config(tmp_path / "a" / "center_embed")
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert (
        main(["triton", str(tiny_onnx), "--out", str(tmp_path), "--triton-tensorrt", "fp16"]) == 1
    )
    assert capsys.readouterr().err.strip() == (
        "error: the TensorRT accelerator runs on GPU instances: add --triton-gpu"
    )
    out = tmp_path / "model.onnx"
    argv = ["export", str(tiny_checkpoint), "--out", str(out), "--no-verify"]
    assert main([*argv, "--triton-repo", str(tmp_path / "b"), "--triton-max-batch", "8"]) == 0
    folder = tmp_path / "b" / "center_embed"
    assert sha256_file(folder / "1" / "model.onnx") == sha256_file(out)
    assert parse_config(folder).max_batch_size == 8
