"""The frontal atlas prior on anatomy attention: laterality by the display convention (the
patient's left is the image's right), the same bias on every code path, kept by checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.encoders.atlas import atlas_bias, box_for
from retrieval.encoders.native import NativeConfig, NativeEncoder, create_native


def test_bias_is_zero_inside_and_negative_outside_on_the_right_side():
    names = ["left lung", "right lung", "left lower lobe", "lung", "right pleura"]
    b = atlas_bias(names, 10, 3.0).reshape(len(names), 10, 10)
    assert b[0, 5, 7] == 0 and b[0, 5, 1] == pytest.approx(-3.0)  # left lung: image right, not left
    assert b[1, 5, 1] == 0 and b[1, 5, 8] == pytest.approx(-3.0)
    assert b[2, 8, 7] == 0 and b[2, 1, 7] < 0  # the lower lobe is low
    assert not b[3].any() and not b[4].any()  # bilateral / unboxed: no bias
    assert box_for("left lower lobe") != box_for("left lung") and box_for("chest") is None
    assert not atlas_bias(names, 10, 0.0).any()


def test_left_lung_attention_lands_on_the_image_right_on_every_path(tmp_path):
    enc = NativeEncoder.random(NativeConfig(spatial_prior=3.0), seed=1)
    rng = np.random.default_rng(0)
    imgs = [rng.random((128, 128)).astype(np.float32) for _ in range(3)]
    left = enc.attention_maps(imgs, anatomy="left lung")
    right = enc.attention_maps(imgs, anatomy="right lung")
    g = left.shape[-1]
    assert (left[:, :, g // 2:].sum((1, 2)) > 0.8).all() and (right[:, :, : g // 2].sum((1, 2)) > 0.8).all()
    # the batched multi-condition path and the one-condition path give the same vectors
    by_cond = enc.encode_conditions(imgs, [None, "left lung", "heart"])
    for a in (None, "left lung", "heart"):
        assert np.allclose(by_cond[a], enc.encode_images(imgs, anatomy=a), atol=1e-5)
    enc.save(tmp_path / "ck")
    again = create_native(tmp_path / "ck")
    assert again.cfg.spatial_prior == 3.0
    assert np.allclose(again.encode_images(imgs, anatomy="left lung"), enc.encode_images(imgs, anatomy="left lung"),
                       atol=1e-5)
