"""Issue 26: regions derived from a lung mask, the attention-region table and its bad input, the
region head's prior, and the heat-map legend."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from eval.attention_regions import attention_regions, format_regions, load_masks
from retrieval.encoders.native import NativeConfig, NativeEncoder
from retrieval.encoders.regions import REGION_HEAD_REGIONS, region_index
from retrieval.imaging.lung_regions import MaskError, attention_share, cell_fractions, lung_regions
from retrieval.imaging.overlay import overlay_png
from retrieval.records import Study


def _mask(h: int = 200, w: int = 200) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[30:150, 30:90] = 255  # patient's right lung: image left
    m[30:160, 110:170] = 255  # patient's left lung: image right, reaching lower
    return m


def test_regions_follow_the_mask_and_the_display_convention():
    r = lung_regions(_mask())
    assert r["right lung"][:, :100].sum() == r["right lung"].sum() > 0  # image left
    assert r["left lung"][:, 100:].sum() == r["left lung"].sum() > 0
    heart = np.argwhere(r["heart"])
    assert heart[:, 0].min() >= 30 + 0.5 * 129 - 1 and heart[:, 0].max() <= 149  # lower half, above the lungs' end
    assert heart[:, 1].min() >= 90 and heart[:, 1].max() < 110  # strictly between the lungs
    assert r["abdomen"][160:].all() and not r["abdomen"][:160].any()  # below the lowest lung row (159)
    assert not (r["pleura"] & r["heart"]).any() and r["pleura"][155, 165]  # costophrenic angle, not heart
    assert r["outside body"][:, :5].all() and not r["outside body"][:, 100].any()
    with pytest.raises(MaskError):
        lung_regions(np.zeros((50, 50), np.uint8))


def test_cell_fractions_and_shares():
    region = np.zeros((10, 10), bool)
    region[:5, :5] = True
    fr = cell_fractions(region, 2)
    assert np.allclose(fr, [[1, 0], [0, 0]])
    att = np.array([[0.25, 0.25], [0.25, 0.25]])
    assert attention_share(att, fr) == pytest.approx(0.25)


def _folder(tmp_path, masks: dict[str, np.ndarray]):
    (tmp_path / "images").mkdir()
    (tmp_path / "lung_masks").mkdir()
    studies, images = [], []
    for i, (name, m) in enumerate(masks.items()):
        img = np.random.default_rng(i).random((200, 200)).astype(np.float32)
        Image.fromarray((img * 255).astype(np.uint8)).save(tmp_path / "images" / f"{name}.png")
        Image.fromarray(m).save(tmp_path / "lung_masks" / f"{name}.png")
        studies.append(Study(study_id=name, patient_id=name, images=[f"images/{name}.png"]))
        images.append(img)
    return studies, images


def test_bad_masks_are_named_and_the_rest_is_scored(tmp_path):
    studies, images = _folder(tmp_path, {"a": _mask(), "b": _mask(150, 200), "c": np.zeros((200, 200), np.uint8)})
    keep, masks, problems = load_masks(tmp_path, studies, images)
    assert keep == [0]
    assert any("b.png" in p and "150" in p for p in problems) and any("c.png" in p for p in problems)
    enc = NativeEncoder.random(NativeConfig(spatial_prior=3.0), seed=0)
    res = attention_regions([images[i] for i in keep], masks, enc, ["<global>", "heart", "left lung"], bootstrap=50)
    res["problems"] = problems
    e = res["anatomies"]["heart"]
    assert e["own_region"] == "heart" and 0 <= e["own"] <= 1 and 0 <= e["abdomen"] <= 1
    text = format_regions(res)
    assert "heart" in text and "b.png" in text
    no_masks = load_masks(tmp_path / "images", studies, images)
    assert no_masks[0] == [] and "no lung masks" in no_masks[2][0]


def test_region_prior_keeps_attention_in_the_region():
    import torch

    enc = NativeEncoder.random(NativeConfig(region_prior=3.0, image_size=64), seed=0)
    region = enc.model.region
    t = int(enc.model.pos.shape[1])
    with torch.no_grad():  # a region head that says: the heart is the first patch, abdomen the last
        region.linear.weight.zero_()
        region.linear.bias.fill_(-8.0)
        heart, abdomen = REGION_HEAD_REGIONS.index("heart"), REGION_HEAD_REGIONS.index("abdomen")
        region.linear.weight[heart, region.mean.shape[0]] = 16.0
        region.linear.weight[abdomen, region.mean.shape[0] + t - 1] = 16.0
    imgs = [np.random.default_rng(1).random((64, 64)).astype(np.float32)]
    att = enc.attention_conditions(imgs, ["heart", None])
    assert att["heart"][0].reshape(-1)[0] > 0.9
    assert att[None][0].reshape(-1)[-1] < 1e-3  # the whole image never looks at the abdomen
    assert region_index("diaphragm") is None and region_index("left lower lobe") == region_index("left lung")


def test_heatmap_has_a_legend():
    img = np.random.default_rng(0).random((100, 80)).astype(np.float32)
    att = np.random.default_rng(1).random((7, 7))
    with Image.open(io.BytesIO(overlay_png(img, att))) as im:
        assert im.size[0] == 80 and im.size[1] > 100
    with Image.open(io.BytesIO(overlay_png(img, att, legend=False))) as im:
        assert im.size == (80, 100)
