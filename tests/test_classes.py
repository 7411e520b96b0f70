"""Issue 26: same-class retrieval by class (Kermany layout), unknown classes named by row."""

from __future__ import annotations

import numpy as np

from eval.classes import class_base_rates, class_precision, study_classes
from retrieval.records import Study


def test_classes_from_the_kermany_layout_and_unknown_rows(tmp_path):
    (tmp_path / "labels.csv").write_text(
        "image,patient_id,view,labels,pathogen\n"
        "images/a.jpeg,p1,AP,No Finding,\n"
        "images/b.jpeg,p2,AP,Pneumonia,bacteria\n"
        "images/c.jpeg,p3,AP,Pneumonia,virus\n"
        "images/d.jpeg,p4,AP,Pneumonia,fungus\n")
    studies = [Study(study_id=x, images=[f"images/{x}.jpeg"]) for x in "abcd"]
    classes, problems = study_classes(tmp_path, studies)
    assert classes is not None and list(classes) == ["normal", "bacterial", "viral", ""]
    assert len(problems) == 1 and "row 5" in problems[0] and "fungus" in problems[0]
    (tmp_path / "labels.csv").write_text("image,labels\nimages/a.jpeg,No Finding\n")
    assert study_classes(tmp_path, studies) == (None, [])


def test_same_class_precision_excludes_the_query():
    classes = np.array(["normal", "normal", "viral", "viral", ""], dtype=object)
    emb = np.eye(5)
    emb[1] = emb[0]
    emb[3] = emb[2]
    p = class_precision(emb @ emb.T, classes, 1)
    assert np.allclose(p["normal"][:2], 1) and np.isnan(p["normal"][2:]).all()
    assert np.allclose(p["viral"][2:4], 1)
    assert class_base_rates(classes)["normal"] == 0.25
