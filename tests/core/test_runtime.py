"""The runtime seam (issue 13): choosing a runtime and precision, parity of each runtime and
precision with onnxruntime fp32 on real images, the service and CLI over OpenVINO, and
`center-embed bench`.

OpenVINO is in the `dev` extra, so these run in CI; bf16 needs a CPU with AVX512-BF16 or
AMX and skips elsewhere (saying so). The CIFAR-10 case runs where a trained model is at
hand (CENTER_EMBED_CIFAR_MODEL) and is marked slow.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from center_embed.errors import UserError
from center_embed.runtime import OnnxModel, RuntimeOptions, choose_runtime, cpu_bf16_flags
from tests.helpers import ROOT

ov = pytest.importorskip("openvino")
needs_bf16 = pytest.mark.skipif(not cpu_bf16_flags(), reason="CPU has no AVX512-BF16 or AMX")
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


@pytest.fixture(scope="session")
def tiny_int8_onnx(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from center_embed.export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("rt8") / "tiny-int8.onnx"
    return export_checkpoint(tiny_checkpoint, out, int8=True)


def split_images(folder: Path, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, size, size, 3), labels (N,)) of folder/test/<class>/*, classes sorted."""
    images, labels = [], []
    for label, class_dir in enumerate(sorted((folder / "test").iterdir())):
        for path in sorted(class_dir.iterdir()):
            images.append(np.asarray(Image.open(path).convert("RGB").resize((size, size))))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


# --------------------------------------------------------------------------- choosing


def choose(runtime="auto", precision="auto", **kw):
    defaults = {"file_precision": "fp32", "device": "cpu",
                "installed": ["onnxruntime", "openvino"], "bf16_flags": ["amx_bf16"]}  # fmt: skip
    return choose_runtime(runtime, precision, **{**defaults, **kw})


def test_auto_picks_openvino_bf16_where_installed_and_supported():
    picked = choose()
    assert (picked.runtime, picked.precision) == ("openvino", "bf16")
    assert "amx_bf16" in picked.reason and "auto" in picked.reason


def pair(choice) -> tuple[str, str]:
    return choice.runtime, choice.precision


def test_auto_falls_back_by_what_is_installed_and_supported():
    assert pair(choose(installed=["onnxruntime"])) == ("onnxruntime", "fp32")
    assert pair(choose(bf16_flags=[])) == ("openvino", "fp32")
    assert pair(choose(file_precision="int8")) == ("openvino", "int8")
    assert pair(choose(device="cuda")) == ("onnxruntime", "fp32")  # OpenVINO: CPU only here
    assert pair(choose("onnxruntime")) == ("onnxruntime", "fp32")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"runtime": "openvino", "installed": ["onnxruntime"]}, "pip install '.[openvino]'"),
        ({"runtime": "onnxruntime", "precision": "bf16"}, "bf16 needs --runtime openvino"),
        ({"runtime": "openvino", "precision": "bf16", "bf16_flags": []}, "neither AVX512-BF16"),
        ({"precision": "bf16", "file_precision": "int8"}, "bf16 runs an fp32 file"),
        ({"precision": "int8"}, "center-embed export --int8"),
        ({"precision": "fp32", "file_precision": "int8"}, "needs the fp32 export"),
        ({"runtime": "openvino", "device": "cuda"}, "CUDA needs --runtime onnxruntime"),
        ({"runtime": "tensorrt"}, "runtime must be one of"),
        ({"installed": []}, "no ONNX runtime is installed"),
    ],
)  # fmt: skip
def test_impossible_choices_are_one_clear_error(kwargs, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        choose(**kwargs)


# --------------------------------------------------------------------------- parity


def parity_against_onnxruntime(path: Path, images: np.ndarray, labels: np.ndarray, **kw):
    from center_embed.export.verify import runtime_parity

    model = OnnxModel(path, RuntimeOptions(device="cpu", **kw))
    reference = OnnxModel(path, RuntimeOptions(device="cpu")).run_batched(images, 16)
    return model, runtime_parity(model.run_batched(images, 16), reference, labels,
                                 model.info.unknown)  # fmt: skip


@pytest.mark.parametrize(
    "precision", ["fp32", pytest.param("bf16", marks=needs_bf16)]
)  # fmt: skip
def test_openvino_agrees_with_onnxruntime_on_real_images(tiny_onnx, tiny_folder, precision):
    images, labels = split_images(tiny_folder)
    model, parity = parity_against_onnxruntime(
        tiny_onnx, images, labels, runtime="openvino", precision=precision
    )
    assert model.runtime["runtime"] == "openvino" and model.runtime["precision"] == precision
    assert parity["label_agreement"] >= 0.99
    bound = 1e-4 if precision == "fp32" else 0.05  # RUNTIME_TOLERANCES["distances"]
    assert parity["distances"] <= bound
    assert parity["embeddings"] <= (1e-4 if precision == "fp32" else 0.1)
    # The atypicality runs in the runtime's precision too: on images it is far from 0 for
    # (flat colours, noise) it stays within the distances' bound.
    rng = np.random.default_rng(3)
    odd = np.concatenate([
        np.broadcast_to(rng.integers(0, 256, (4, 1, 1, 3), dtype=np.uint8), (4, 32, 32, 3)),
        rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
    ])  # fmt: skip
    _, odd_parity = parity_against_onnxruntime(
        tiny_onnx, odd, np.zeros(8, np.int64), runtime="openvino", precision=precision
    )
    assert odd_parity["atypical_share_reference"] == 1.0 == odd_parity["atypical_share"]
    assert odd_parity["atypicality"] <= bound and odd_parity["passed"]


def test_openvino_runs_the_int8_file_as_onnxruntime_does(tiny_int8_onnx, tiny_folder):
    images, labels = split_images(tiny_folder)
    model, parity = parity_against_onnxruntime(tiny_int8_onnx, images, labels, runtime="openvino")
    assert model.runtime["precision"] == "int8"
    assert parity["label_agreement"] >= 0.99
    assert parity["distances"] <= 0.05


@needs_bf16
def test_bf16_distances_are_exact_fp32_of_its_embeddings(tiny_onnx):
    """The distance tail runs in fp32, so /v1/distances on bf16 embeddings gives the same
    distances, and the same unknown scores less the images' atypicality (noise: far from 0)."""
    from center_embed.contract import center_scores, read_centers

    model = OnnxModel(tiny_onnx, RuntimeOptions(device="cpu", runtime="openvino", precision="bf16"))
    images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    out = model.run(images)
    info = model.info
    assert info.score_kind == "squared_euclidean_minus_norm" and info.true_distances
    assert model.has_atypicality and (out["atypicality"] > 0).all()
    expected = center_scores(out["embeddings"], read_centers(tiny_onnx), info.score_kind,
                             True, out["atypicality"])  # fmt: skip
    for name in ("distances", "min_distances", "unknown_scores"):
        np.testing.assert_allclose(out[name], expected[name], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["labels"], expected["labels"])
    assert out["labels"].dtype == np.int64


def test_openvino_from_several_threads_and_empty_batches(tiny_onnx):
    from concurrent.futures import ThreadPoolExecutor

    model = OnnxModel(
        tiny_onnx,
        RuntimeOptions(device="cpu", threads=1, runtime="openvino", precision="fp32"),
        streams=2,
    )
    rng = np.random.default_rng(2)
    batches = [rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (1, 5, 9, 3)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(model.run, batches * 3))
    reference = OnnxModel(tiny_onnx, RuntimeOptions(device="cpu"))
    for batch, out in zip(batches * 3, outs, strict=True):
        np.testing.assert_allclose(out["distances"], reference.run(batch)["distances"], rtol=1e-4)
    empty = model.run(batches[0][:0])
    assert {k: v.shape for k, v in empty.items()} == {
        "embeddings": (0, model.info.embedding_dim), "distances": (0, model.info.num_classes),
        "labels": (0,), "min_distances": (0,), "unknown_scores": (0,), "atypicality": (0,),
    }  # fmt: skip


def test_openvino_says_a_non_model_file_is_unreadable(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 this is not a protobuf model" * 10)
    with pytest.raises(UserError, match="not a readable ONNX model|no center_embed metadata"):
        OnnxModel(bad, RuntimeOptions(runtime="openvino", precision="fp32"))


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("CENTER_EMBED_CIFAR_MODEL") or not CIFAR.is_dir(),
    reason="needs CENTER_EMBED_CIFAR_MODEL (a CIFAR-10 model) and ../shared/data/cifar10",
)
@pytest.mark.parametrize(
    ("runtime", "precision"),
    [("openvino", "fp32"), pytest.param("openvino", "bf16", marks=needs_bf16)],
)
def test_cifar10_parity_holds_with_the_threshold(runtime, precision):
    from center_embed.export.verify import split_accuracy

    result = split_accuracy(os.environ["CENTER_EMBED_CIFAR_MODEL"], str(CIFAR), "test",
                            RuntimeOptions(runtime=runtime, precision=precision))  # fmt: skip
    parity = result["parity"]
    assert parity["label_agreement"] >= 0.99
    assert parity["distances"] <= 0.05 and parity["atypicality"] <= 0.05
    assert parity["unknown_agreement"] >= 0.99
    assert abs(result["nearest_center_accuracy"] - parity["reference_accuracy"]) <= 0.005


# --------------------------------------------------------------------------- service, CLI


def test_service_serves_through_openvino_and_says_so(tiny_onnx, tiny_folder):
    from fastapi.testclient import TestClient

    from center_embed.service.app import create_app
    from center_embed.service.settings import Settings

    settings = Settings(model=tiny_onnx, runtime="auto", precision="fp32")
    path = tiny_folder / "test" / "green" / "0001.png"
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)  # the warm-up runs after startup
        assert client.get("/readyz").status_code == 200
        runtime = client.get("/v1/model").json()["runtime"]
        answer = client.post("/v1/classify", files={"files": path.read_bytes()}).json()
    assert runtime["runtime"] == "openvino" and runtime["precision"] == "fp32"
    assert "auto" in runtime["reason"] and runtime["provider"] == "CPU"
    reference = OnnxModel(tiny_onnx)
    expected = reference.run(reference.decode(path.read_bytes())[None])
    assert answer["results"][0]["label"] == int(expected["labels"][0])
    assert answer["results"][0]["min_distance"] == pytest.approx(
        float(expected["min_distances"][0]), rel=1e-4
    )


def test_score_and_verify_cli_with_openvino(tiny_onnx, tiny_folder, tmp_path, capsys):
    import pyarrow.parquet as pq

    from center_embed.cli import main

    out = tmp_path / "s.parquet"
    args = ["score", str(tiny_onnx), str(tiny_folder / "test"), "--out", str(out)]
    assert main([*args, "--runtime", "openvino", "--precision", "fp32", "--no-progress"]) == 0
    assert main([*args[:4], str(tmp_path / "r.parquet"), "--no-progress"]) == 0
    ours, reference = pq.read_table(out), pq.read_table(tmp_path / "r.parquet")
    assert ours.column("label").to_pylist() == reference.column("label").to_pylist()
    assert ours.schema.metadata == reference.schema.metadata  # which model scored what

    capsys.readouterr()
    verify = ["verify", str(tiny_onnx), "--data", str(tiny_folder), "--runtime", "openvino"]
    status = main([*verify, "--precision", "fp32"])
    printed = capsys.readouterr().out
    assert "label agreement        1.0000" in printed
    assert "on openvino fp32" in printed
    assert status == 0


def test_bench_prints_every_runtime_and_precision(tiny_onnx, capsys):
    from center_embed.cli import main

    assert main(["bench", str(tiny_onnx), "--batch-sizes", "1,4", "--seconds", "0.05"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {tuple(line.split()[:3]) for line in lines[1:-1]}
    expected = {("onnxruntime", "fp32"), ("openvino", "fp32")}
    expected |= {("openvino", "bf16")} if cpu_bf16_flags() else set()
    assert rows == {(rt, p, b) for rt, p in expected for b in ("1", "4")}
    assert all(float(line.split()[3]) > 0 for line in lines[1:-1])
    # The best row over every batch size, and the batch it needs.
    speeds = {tuple(line.split()[:3]): float(line.split()[3]) for line in lines[1:-1]}
    runtime, precision, batch = max(speeds, key=speeds.get)
    assert lines[-1] == (
        f"fastest: --runtime {runtime} --precision {precision}, "
        f"{speeds[(runtime, precision, batch)]:.0f} images/s at batch {batch}"
    )


def test_inspect_says_what_auto_would_pick(tiny_onnx, capsys):
    from center_embed.cli import main

    assert main(["inspect", str(tiny_onnx)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "runtime auto" in x]
    expected = "openvino bf16" if cpu_bf16_flags() else "openvino fp32"
    assert len(line) == 1 and expected in line[0]


def test_a_model_with_non_square_inputs_is_refused_at_open(tiny_onnx, tmp_path):
    """Decoding, scoring and serving all resize to a square: one check, when the file opens."""
    import onnx

    proto = onnx.load(str(tiny_onnx))
    for prop in proto.metadata_props:
        if prop.key == "center_embed.input_size":
            prop.value = "[32, 16]"
    path = tmp_path / "oblong.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(UserError, match="only square inputs are supported, got 32x16"):
        OnnxModel(path, RuntimeOptions(device="cpu"))
    assert OnnxModel(tiny_onnx, RuntimeOptions(device="cpu")).image_size == 32


def test_a_model_checks_itself_under_another_runtime_and_falls_back(tiny_onnx, tmp_path, caplog):
    """The export stores a self-check; OpenVINO opening the file runs it (and passes); on
    a perturbed copy (its recorded labels moved) it misses, and the model falls back to
    onnxruntime at the file's own precision, saying so in one log line and in `runtime`."""
    import json

    import onnx

    from center_embed.contract import SelfCheck

    own = OnnxModel(tiny_onnx, RuntimeOptions(device="cpu"))
    check = SelfCheck.from_metadata(own.info.metadata["center_embed.self_check"])
    assert check.images.shape == (32, 32, 32, 3) and own.self_check is None  # its own runtime
    np.testing.assert_array_equal(own.run(check.images)["labels"], check.labels)
    other = OnnxModel(tiny_onnx, RuntimeOptions(device="cpu", runtime="openvino", precision="fp32"))
    assert other.self_check["passed"] and other.choice.runtime == "openvino"
    assert other.runtime["self_check"]["label_agreement"] == 1.0

    proto = onnx.load(str(tiny_onnx))
    for prop in proto.metadata_props:
        if prop.key == "center_embed.self_check":
            values = json.loads(prop.value)
            values["labels"] = [(label + 1) % 3 for label in values["labels"]]
            prop.value = json.dumps(values)
    perturbed = tmp_path / "perturbed.onnx"
    onnx.save(proto, str(perturbed))
    with caplog.at_level("WARNING", logger="center_embed.runtime"):
        fell = OnnxModel(perturbed, RuntimeOptions(device="cpu", runtime="openvino",
                                                   precision="fp32"))  # fmt: skip
    assert (fell.choice.runtime, fell.choice.precision) == ("onnxruntime", "fp32")
    assert fell.provider == "CPUExecutionProvider"
    assert fell.self_check["fallback"] and not fell.self_check["passed"]
    assert fell.self_check["label_agreement"] == 0.0
    assert fell.runtime["reason"].startswith("fallback: openvino fp32 failed the file's self-check")
    assert [r.getMessage() for r in caplog.records if "self-check" in r.getMessage()] == [
        f"perturbed.onnx: {fell.choice.reason}"
    ]
    np.testing.assert_array_equal(fell.run(check.images)["labels"], own.run(check.images)["labels"])


@pytest.mark.parametrize("field", ["labels", "unknown", "min_distances", "unknown_scores"])
def test_a_self_check_whose_rows_disagree_is_refused_by_name(field):
    """Every recorded column must have a row per image: a short one is a UserError naming
    the file, never a numpy broadcast error later in the comparison."""
    import json

    from center_embed.contract import SelfCheck

    n = 4
    check = SelfCheck(np.zeros((n, 8, 8, 3), np.uint8), np.zeros(n, np.int64), np.zeros(n, bool),
                      np.zeros(n, np.float32), np.zeros(n, np.float32))  # fmt: skip
    values = check.to_metadata()
    assert SelfCheck.from_metadata(json.dumps(values)).images.shape == (n, 8, 8, 3)
    values[field] = values[field][:-1]
    with pytest.raises(UserError, match=r"m\.onnx has a malformed self_check \(shapes disagree"):
        SelfCheck.from_metadata(json.dumps(values), "m.onnx")


def test_serve_and_score_default_to_auto_checked_by_the_self_check(tiny_onnx, monkeypatch):
    """With no flag nor setting, serve and score ask for auto; the model then runs what
    choose_runtime picks here, and a pick other than the export's own ran the self-check."""
    import argparse

    from center_embed.cli.common import add_runtime_arguments, runtime_options
    from center_embed.service.served_model import ServedModel
    from center_embed.service.settings import Settings

    monkeypatch.delenv("CENTER_EMBED_RUNTIME", raising=False)
    monkeypatch.delenv("CENTER_EMBED_PRECISION", raising=False)
    p = argparse.ArgumentParser()
    add_runtime_arguments(p, from_environment=True)
    options = runtime_options(p.parse_args([]))
    assert (options.runtime, options.precision) == ("auto", "auto")
    settings = Settings(model=tiny_onnx)
    assert settings.runtime_options().runtime == "auto"
    served = ServedModel.open(tiny_onnx, replace(settings.runtime_options(), device="cpu"))
    picked = choose_runtime(file_precision="fp32", device="cpu")
    runtime = served.model.runtime
    assert (runtime["runtime"], runtime["precision"]) == (picked.runtime, picked.precision)
    own = (picked.runtime, picked.precision) == ("onnxruntime", "fp32")
    assert (runtime["self_check"] is None) == own
    assert own or runtime["self_check"]["passed"]
    monkeypatch.setenv("CENTER_EMBED_RUNTIME", "onnxruntime")  # the setting still decides
    assert runtime_options(p.parse_args([])).runtime == "onnxruntime"
