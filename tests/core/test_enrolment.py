"""Enrolment in the core: a new class's center and threshold, the immutable snapshot, the
centers file (another model's file refused, locked read-modify-write across processes)."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import re
from pathlib import Path

import numpy as np
import pytest

from center_embed import contract
from center_embed.enrolment import (
    MAX_CLASS_NAME,
    CenterSet,
    CentersFile,
    EnrolmentError,
    centers_file_for,
    check_class_name,
    enrolment_threshold,
)
from center_embed.errors import UserError
from tests.helpers import small_model_info

SHA = "ab" * 32


def _base(info: contract.ModelInfo | None = None) -> CenterSet:
    centers = np.array([[0, 0, 0], [10, 0, 0]], np.float32)
    return CenterSet.from_model(info or small_model_info(), centers, SHA)


def test_enrolled_center_is_the_mean_and_scores_like_a_trained_class():
    rng = np.random.default_rng(0)
    new = rng.normal(loc=[0, 10, 0], size=(8, 3)).astype(np.float32)
    base = _base()
    enrolled = base.with_class("c", new, info=small_model_info(), source="test")
    assert enrolled.names == ("a", "b", "c") and enrolled.version == 1 and base.version == 0
    expected = [sum(float(row[j]) for row in new) / len(new) for j in range(3)]  # brute force
    np.testing.assert_allclose(enrolled.centers[2], expected, rtol=1e-6)
    np.testing.assert_array_equal(enrolled.centers[:2], base.centers)
    out = enrolled.scores(np.array([[0.1, 9.5, 0.2]], np.float32))
    assert out["labels"].tolist() == [2]
    brute = [sum((0.1 * (j == 0) + 9.5 * (j == 1) + 0.2 * (j == 2) - c[j]) ** 2
                 for j in range(3)) for c in enrolled.centers.tolist()]  # fmt: skip
    np.testing.assert_allclose(out["distances"][0], brute, rtol=1e-5, atol=1e-4)
    assert enrolled.log[-1]["class"] == "c" and enrolled.log[-1]["images"] == 8
    with pytest.raises(ValueError):  # a snapshot's centers never change in place
        enrolled.centers[0, 0] = 1.0


def test_threshold_rule_is_the_quantile_of_held_out_distances():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(6, 3)).astype(np.float32)
    threshold, rule = enrolment_threshold(e, "squared_euclidean", 0.5, fallback=7.0)
    loo = sorted(
        sum((float(e[i, j]) - sum(float(e[k, j]) for k in range(6) if k != i) / 5) ** 2
            for j in range(3))
        for i in range(6)
    )  # fmt: skip
    assert threshold == pytest.approx(loo[2], rel=1e-5)  # inverted_cdf: the 3rd of 6 at q=0.5
    assert "6 held-out" in rule
    assert enrolment_threshold(e[:4], "squared_euclidean", 0.5, 7.0)[0] == 7.0  # too few images
    assert enrolment_threshold(e, "squared_euclidean", 0.5, None)[0] is None  # model has none


def test_thresholds_follow_the_models_quantile_and_the_unknown_flag():
    e = np.random.default_rng(2).normal(loc=[0, 10, 0], size=(30, 3)).astype(np.float32)
    info = small_model_info(quantile=0.9)
    enrolled = _base(info).with_class("c", e, info=info)
    expected, _ = enrolment_threshold(e, "squared_euclidean", 0.9, 2.0)
    assert enrolled.thresholds["c"] == pytest.approx(expected)
    scoped = enrolled.model_info(info)
    assert scoped.class_names == ["a", "b", "c"]
    np.testing.assert_allclose(scoped.label_thresholds(), [1.0, 1.5, expected])
    flags = scoped.unknown(np.array([expected * 1.01, expected * 0.99]), np.array([2, 2]))
    assert flags.tolist() == [True, False]


def test_atypicality_is_part_of_the_threshold_and_of_every_distance():
    """A class enrolled from images that are all atypical (another domain) has a threshold
    that covers their atypicality, so its own kind of image is accepted; the images'
    atypicality is kept for mode=add and in the centers file, and read as 0 where absent."""
    rng = np.random.default_rng(5)
    e = rng.normal(loc=[0, 10, 0], size=(12, 3)).astype(np.float32)
    atypicality = np.full(12, 40.0, np.float32) + rng.uniform(0, 5, 12).astype(np.float32)
    info = small_model_info(quantile=0.9)
    plain = _base(info).with_class("c", e, info=info)
    other = _base(info).with_class("c", e, info=info, atypicality=atypicality)
    bare, _ = enrolment_threshold(e, "squared_euclidean", 0.9, 2.0)
    with_it, _ = enrolment_threshold(e, "squared_euclidean", 0.9, 2.0, atypicality)
    assert plain.thresholds["c"] == pytest.approx(bare)
    assert other.thresholds["c"] == pytest.approx(with_it)
    # Brute force: held-out (leave-one-out) squared distances plus each image's own value.
    loo = sorted(
        float(((e[i] - np.delete(e, i, 0).mean(0)) ** 2).sum()) + float(atypicality[i])
        for i in range(12)
    )
    assert with_it == pytest.approx(loo[int(np.ceil(0.9 * 12)) - 1], rel=1e-5)  # inverted_cdf
    out = other.scores(e[:2], atypicality[:2])
    bare = other.scores(e[:2])  # distances never hold it; the unknown score does
    np.testing.assert_array_equal(out["distances"], bare["distances"])
    np.testing.assert_allclose(out["unknown_scores"], bare["unknown_scores"] + atypicality[:2],
                               rtol=1e-6)  # fmt: skip
    scoped = other.model_info(info)
    assert not scoped.unknown(out["unknown_scores"], out["labels"]).any()  # its own kind: known
    # Had the threshold left the atypicality out, the class's own images would be unknown.
    assert plain.model_info(info).unknown(out["unknown_scores"], out["labels"]).all()
    added = other.with_class("c", e[:3], info=info, mode="add")  # no atypicality given: 0
    np.testing.assert_array_equal(added.atypicality_of("c"), np.r_[atypicality, np.zeros(3)])
    with pytest.raises(ValueError, match="atypicality values"):
        other.with_class("d", e, info=info, atypicality=atypicality[:3])
    # Fewer than 5 images: the global threshold, plus their largest atypicality.
    few, rule = enrolment_threshold(e[:3], "squared_euclidean", 0.9, 2.0, atypicality[:3])
    assert few == pytest.approx(2.0 + float(atypicality[:3].max())) and "atypicality" in rule
    assert enrolment_threshold(e[:3], "squared_euclidean", 0.9, 2.0, np.zeros(3))[0] == 2.0


def test_centers_file_keeps_atypicality_and_reads_old_files(tmp_path):
    from center_embed.enrolment import decode_center_set, encode_center_set

    info = small_model_info()
    e = np.ones((6, 3), np.float32)
    a = np.arange(6, dtype=np.float32)
    enrolled = _base().with_class("c", e, info=info, atypicality=a)
    back = decode_center_set(encode_center_set(enrolled), "x")
    np.testing.assert_array_equal(back.atypicality_of("c"), a)
    old = dataclasses.replace(enrolled, atypicality={})  # as written before the output
    np.testing.assert_array_equal(decode_center_set(encode_center_set(old), "x")
                                  .atypicality_of("c"), np.zeros(6))  # fmt: skip


def test_replace_add_and_remove():
    rng = np.random.default_rng(3)
    first, more = rng.normal(size=(4, 3)), rng.normal(size=(6, 3))
    info = small_model_info()
    one = _base().with_class("c", first.astype(np.float32), info=info)
    added = one.with_class("c", more.astype(np.float32), info=info, mode="add")
    np.testing.assert_allclose(added.centers[2], np.vstack([first, more]).mean(0), rtol=1e-5)
    assert added.image_counts() == {"c": 10} and added.log[-1]["action"] == "add"
    replaced = added.with_class("c", more.astype(np.float32), info=info)
    np.testing.assert_allclose(replaced.centers[2], more.mean(0), rtol=1e-5)
    trained = replaced.with_class("a", more.astype(np.float32), info=info)  # a trained class
    assert trained.names == ("a", "b", "c")
    np.testing.assert_allclose(trained.centers[0], more.mean(0), rtol=1e-5)
    gone = trained.without_class("b")
    assert gone.names == ("a", "c") and "b" not in gone.thresholds and gone.version == 5
    np.testing.assert_array_equal(gone.centers, trained.centers[[0, 2]])


@pytest.mark.parametrize(
    "name, message",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("x" * (MAX_CLASS_NAME + 1), "129 characters"),
        ("a\nb", "'\\n'"),
        ("a\x00b", "'\\x00'"),
        ("a\u200bb", "'\\u200b'"),  # zero-width space: a format character
        ("a/b", "'/'"),
    ],
)
def test_bad_class_names(name, message):
    with pytest.raises(EnrolmentError, match=re.escape(message)) as raised:
        check_class_name(name)
    assert raised.value.kind == "bad_name"
    assert check_class_name("x" * MAX_CLASS_NAME) == "x" * MAX_CLASS_NAME
    assert check_class_name("zèbre 2") == "zèbre 2"


def test_refused_changes():
    base, info = _base(), small_model_info()
    with pytest.raises(EnrolmentError, match="no class 'z'") as raised:
        base.without_class("z")
    assert raised.value.kind == "unknown_class"
    with pytest.raises(EnrolmentError, match="last class") as raised:
        base.without_class("a").without_class("b")
    assert raised.value.kind == "last_class"
    with pytest.raises(EnrolmentError, match="trained class") as raised:
        base.with_class("a", np.ones((2, 3), np.float32), info=info, mode="add")
    assert raised.value.kind == "cannot_add"
    with pytest.raises(EnrolmentError, match="no images"):
        base.with_class("c", np.zeros((0, 3), np.float32), info=info)


def test_centers_file_round_trip_and_other_models_refused(tmp_path):
    info = small_model_info()
    path = centers_file_for(tmp_path / "m.onnx")
    assert path.name == "m.onnx.centers.npz"
    store = CentersFile(path, SHA, info)
    assert store.read() is None and store.signature() is None
    e = np.random.default_rng(4).normal(size=(6, 3)).astype(np.float32)
    written = store.update(_base(), lambda c: c.with_class("c", e, info=info, source="t"))
    back = store.read()
    assert back is not None and back.names == written.names and back.version == 1
    np.testing.assert_array_equal(back.centers, written.centers)
    np.testing.assert_array_equal(back.embeddings["c"], e)
    assert back.thresholds == written.thresholds and back.log == written.log
    signature = store.signature()
    store.update(_base(), lambda c: c.without_class("c"))
    assert store.signature() != signature and store.read().version == 2
    with pytest.raises(UserError, match="centers for another model"):
        CentersFile(path, "cd" * 32, info).read()
    path.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable centers file"):
        store.read()


def test_refused_change_leaves_the_file_alone(tmp_path):
    info = small_model_info()
    store = CentersFile(tmp_path / "m.centers.npz", SHA, info)
    store.update(_base(), lambda c: c.with_class("c", np.ones((3, 3), np.float32), info=info))
    before = store.path.read_bytes()
    with pytest.raises(EnrolmentError):
        store.update(_base(), lambda c: c.without_class("nope"))
    assert store.path.read_bytes() == before


def _enrol_many(path: str, start: int) -> None:
    info = small_model_info()
    store = CentersFile(path, SHA, info)
    for i in range(start, start + 10):
        e = np.full((2, 3), float(i), np.float32)
        store.update(_base(info), lambda c, i=i, e=e: c.with_class(f"k{i}", e, info=info))


def test_two_processes_enrolling_lose_nothing(tmp_path: Path):
    """The lock makes read-modify-write atomic across processes (--workers N)."""
    path = str(tmp_path / "m.centers.npz")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_enrol_many, args=(path, s)) for s in (0, 100)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    final = CentersFile(path, SHA, small_model_info()).read()
    expected = {f"k{i}" for i in [*range(10), *range(100, 110)]}
    assert set(final.names) == {"a", "b"} | expected and final.version == 20
    assert json.loads(json.dumps(list(final.log)))[-1]["action"] == "enrol"
