"""One decode path for both engines (center_embed.score.decode): the local scorer and every
way the Ray stages get an image (paths, read_binary_files bytes, read_block's decoded
column) give the same pixels, the same rows and the same error per image. No Ray cluster:
the stages are plain functions and a callable class."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from center_embed.runtime import OnnxModel, RuntimeOptions
from center_embed.score.local import _decode
from center_embed.score.sources import open_source


@pytest.fixture()
def broken_list(tiny_folder: Path, tmp_path: Path) -> Path:
    """A list of paths: a truncated PNG, text named .jpg, a missing file, good images."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        shutil.copy(tiny_folder / "test" / "red" / f"{i:04d}.png", root / f"good{i}.png")
    good = (tiny_folder / "test" / "red" / "0005.png").read_bytes()
    (root / "corrupt.png").write_bytes(good[: len(good) // 2])
    (root / "fake.jpg").write_text("this is not a JPEG")
    names = ["corrupt.png", "fake.jpg", "missing.png", "good0.png", "good1.png", "good2.png"]
    (root / "paths.txt").write_text("\n".join(names) + "\n")
    return root / "paths.txt"


def test_the_engines_decode_alike(tiny_onnx, broken_list, tmp_path):
    from center_embed.score.ray import ScoreBatches, decode_paths
    from center_embed.score.ray.manifest import write_manifest
    from center_embed.score.ray.stages import read_block

    model = OnnxModel(tiny_onnx, RuntimeOptions(device="cpu"))
    size = model.info.input_size[0]
    items = list(open_source(broken_list).items())
    local_pixels, local_errors = _decode(model, items)
    assert local_errors[0].startswith("corrupt or truncated image")
    assert local_errors[1] == "not an image format Pillow can read"
    assert local_errors[2].startswith("cannot read file: ")  # missing.png
    assert local_errors[3:] == [None] * 3 and len(local_pixels) == 3
    paths = [item.path for item in items]
    pixels, errors = decode_paths(paths, size)
    assert errors == local_errors
    np.testing.assert_array_equal(pixels, local_pixels)

    # read_block's decoded column: null where the image failed, the pixels elsewhere
    out = str(tmp_path / "out")
    Path(out).mkdir()
    write_manifest(iter([(item.id, item.path, None) for item in items]), out, len(items))
    block = read_block({"block": np.array([0])}, out, len(items), size, [], decode=True)
    assert block.column("error").to_pylist() == local_errors
    decoded = iter(local_pixels)
    one_by_one = [None if e else next(decoded).tobytes() for e in local_errors]
    expected = pa.array(one_by_one, pa.binary(size * size * 3))
    assert block.column("image").combine_chunks().equals(expected)

    # ScoreBatches: the same rows from paths, from read_block's column and from bytes
    actor = ScoreBatches(str(tiny_onnx))
    from_paths = actor(block.drop_columns(["image", "error"]))
    from_block = actor(block)
    assert from_block.equals(from_paths)
    assert from_paths.column("error").to_pylist() == local_errors
    readable = [0, 1, 3, 4, 5]  # read_binary_files lists only files that exist
    data = [Path(paths[i]).read_bytes() for i in readable]
    from_bytes = actor(pa.table({"path": [paths[i] for i in readable], "bytes": data}))
    expected = from_paths.drop_columns(["index"]).take(readable)
    assert from_bytes.column("id").to_pylist() == expected.column("path").to_pylist()
    assert from_bytes.drop_columns(["id"]).equals(expected.drop_columns(["id"]))
