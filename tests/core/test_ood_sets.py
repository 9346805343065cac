"""The far-OOD sets of center_embed.ood_sets: images unlike the known ones, reproducible."""

from __future__ import annotations

import numpy as np

from center_embed import ood_sets


def test_far_ood_sets_are_images_unlike_the_known_ones():
    rng = np.random.default_rng(2)
    known = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    sets = ood_sets.far_ood_sets(known, n=12, seed=0)
    assert set(sets) == {"uniform_noise", "gaussian_noise", "constant_colour", "blurred",
                         "inverted", "glyphs", "shapes"}  # fmt: skip
    for name, images in sets.items():
        assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8, name
    assert (sets["constant_colour"].std(axis=(1, 2)) == 0).all()
    glyphs = sets["glyphs"]
    assert (glyphs[..., 0] == glyphs[..., 2]).all() and glyphs.max() >= 160  # gray, drawn
    blocks = sets["blurred"].reshape(12, 4, 8, 4, 8, 3)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # constant 8x8 blocks
    assert np.array_equal(ood_sets.far_ood_sets(known, 12, 0)["shapes"], sets["shapes"])
    gray = ood_sets.shifted_sets(known, n=5)["grayscale"]
    assert gray.shape == (5, 32, 32, 3) and (gray[..., 0] == gray[..., 1]).all()
