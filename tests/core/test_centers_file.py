"""The centers file's whole structure is checked on every read: a file that is a valid .npz
but not a valid centers file (odd meta, NaN, wrong shapes) is one UserError line naming the
file, never another exception; and class names are normalised before they are compared."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import unicodedata

import numpy as np
import pytest

from center_embed.enrolment import (
    CenterSet,
    CentersFile,
    EnrolmentError,
    check_class_name,
    decode_center_set,
    encode_center_set,
)
from center_embed.errors import UserError
from tests.helpers import small_model_info

SHA = "ab" * 32


def _enrolled() -> CenterSet:
    base = CenterSet.from_model(
        small_model_info(), np.array([[0, 0, 0], [10, 0, 0]], np.float32), SHA
    )
    e = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    return base.with_class("c", e, info=small_model_info(), atypicality=np.zeros(6, np.float32))


def _npz(meta: object, **arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
    return buffer.getvalue()


def _meta(centers: CenterSet) -> dict:
    with np.load(io.BytesIO(encode_center_set(centers))) as npz:
        return json.loads(str(npz["meta"]))


def _arrays(centers: CenterSet) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(encode_center_set(centers))) as npz:
        return {k: npz[k] for k in npz.files if k != "meta"}


def _bad_files() -> dict[str, bytes]:
    good = _enrolled()
    meta, arrays = _meta(good), _arrays(good)
    nan_centers = good.centers.copy()
    nan_centers[0, 0] = np.nan
    bad_embeddings = arrays["embeddings_0"].copy()
    bad_embeddings[2, 1] = np.inf

    def with_meta(**changes: object) -> bytes:
        return _npz({**meta, **changes}, **arrays)

    def with_arrays(**changes: np.ndarray) -> bytes:
        return _npz(meta, **{**arrays, **changes})

    return {
        "meta a list": _npz([1, 2], **arrays),
        "meta a number": _npz(3, **arrays),
        "meta not JSON text": _raw_meta(np.arange(3), arrays),
        "no meta": _raw_meta(None, arrays),
        "no names": with_meta(names=None),
        "names of numbers": with_meta(names=[1, 2, 3]),
        "names repeat": with_meta(names=["a", "a", "c"]),
        "thresholds a list": with_meta(thresholds=[1.0]),
        "NaN threshold": with_meta(thresholds={"a": math.nan}),
        "infinite threshold": with_meta(thresholds={"a": math.inf}),
        "string threshold": with_meta(thresholds={"a": "1.0"}),
        "boolean threshold": with_meta(thresholds={"a": True}),
        "threshold of no class": with_meta(thresholds={"zz": 1.0}),
        "version a string": with_meta(version="1"),
        "log of strings": with_meta(log=["x"]),
        "enrolled unknown": with_meta(enrolled=["zz"]),
        "NaN centers": with_arrays(centers=nan_centers),
        "centers 1-D": with_arrays(centers=nan_centers.ravel()),
        "centers of text": with_arrays(centers=np.array([["a"] * 3] * 3)),
        "too few centers": with_arrays(centers=good.centers[:2]),
        "no centers": _npz(meta, **{k: v for k, v in arrays.items() if k != "centers"}),
        "infinite embeddings": with_arrays(embeddings_0=bad_embeddings),
        "embeddings of another dim": with_arrays(embeddings_0=np.zeros((6, 4), np.float32)),
        "no embeddings": _npz(meta, centers=arrays["centers"]),
        "atypicality short": with_arrays(atypicality_0=np.zeros(5, np.float32)),
        "atypicality NaN": with_arrays(atypicality_0=np.full(6, np.nan, np.float32)),
    }


def _raw_meta(meta: np.ndarray | None, arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **({} if meta is None else {"meta": meta}), **arrays)
    return buffer.getvalue()


def test_a_good_file_reads_back():
    good = _enrolled()
    back = decode_center_set(encode_center_set(good), "m.centers.npz")
    assert back.names == good.names and back.thresholds == good.thresholds
    np.testing.assert_array_equal(back.centers, good.centers)
    np.testing.assert_array_equal(back.embeddings["c"], good.embeddings["c"])


@pytest.mark.parametrize("kind", list(_bad_files()))
def test_every_bad_structure_is_one_user_error_line(kind):
    data = _bad_files()[kind]
    with pytest.raises(UserError) as raised:
        decode_center_set(data, "m.centers.npz")
    message = str(raised.value)
    assert message.startswith("m.centers.npz is not a readable centers file (")
    assert "\n" not in message and len(message) < 300


def test_the_file_is_named_as_its_reader_says(tmp_path):
    path = tmp_path / "deep" / "m.centers.npz"
    path.parent.mkdir()
    path.write_bytes(_bad_files()["meta a list"])
    with pytest.raises(UserError) as raised:
        CentersFile(path, SHA, small_model_info(), name=path.name).read()
    assert str(tmp_path) not in str(raised.value)
    assert str(raised.value).startswith("m.centers.npz is not a readable centers file")
    with pytest.raises(UserError, match="deep/m.centers.npz"):
        CentersFile(path, SHA, small_model_info()).read()  # the CLI's readers: the path given


# --------------------------------------------------------------------------- class names


def test_class_names_are_normalised_before_comparison():
    nfc = "caf\u00e9"
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfd != nfc and check_class_name(nfd) == nfc
    assert check_class_name("  cat \t") == "cat"
    info, e = small_model_info(), np.ones((2, 3), np.float32)
    base = CenterSet.from_model(info, np.array([[0, 0, 0], [10, 0, 0]], np.float32), SHA)
    one = base.with_class(nfc, e, info=info).with_class(nfd, e * 2, info=info)
    two = one.with_class(" cat ", e, info=info).with_class("cat", e, info=info)
    assert two.names == ("a", "b", nfc, "cat")
    assert two.without_class(nfd).names == ("a", "b", "cat")
    assert two.without_class(" cat").names == ("a", "b", nfc)


@pytest.mark.parametrize("name", ["a\u2028b", "a\u2029b", "a\u00a0b", "a\u3000b"])
def test_separators_are_not_printable_names(name):
    with pytest.raises(EnrolmentError, match="U\\+") as raised:
        check_class_name(name)
    assert raised.value.kind == "bad_name"


def test_a_good_file_survives_the_checks_after_a_removal():
    gone = dataclasses.replace(_enrolled()).without_class("a")
    back = decode_center_set(encode_center_set(gone), "m")
    assert back.names == ("b", "c") and set(back.thresholds) <= {"b", "c"}
