"""The query image's own reading of findings: calibrated probe probabilities and their thresholds.

Why a separate, calibrated layer on top of the label probe: the probe is a class-balanced logistic
regression, so its raw probability is not a probability of the finding (balancing inflates the
rare positives) and a fixed cut such as 0.5 means a different thing for every finding. Drafting
needs three decisions per finding (present / uncertain / absent) it can defend, so ``medrag
train`` (:mod:`indexer.reading`) fits, *inside the training images only*, by patient-grouped
5-fold cross-validation of the probe itself:

* a Platt calibration per label (out-of-fold probe logits -> observed rate), so a calibrated 0.3
  means "three in ten such images carried the label";
* ``uncertain_at``: the calibrated threshold with the best out-of-fold F1 (a hedged statement,
  "possible X", is a positive mention when drafts are scored);
* ``present_at``: the lowest threshold at or above it whose out-of-fold precision reaches
  ``PRESENT_PRECISION`` (None when no threshold does: that finding is only ever hedged);
* ``noise``: how much the calibrated probability moves under mild, plausible acquisition changes
  (gamma, a 4 % zoom; never a horizontal flip: laterality matters), so an interval change
  between two studies smaller than that is hedged, not claimed.

The numbers live in ``reading.json`` beside the checkpoint's ``config.json``; no threshold is set
by hand. The probe reads no side (NIH labels carry none), so a reading states *whether*, never
*where*: :attr:`FindingReading.sides` is empty until an encoder that reads sides fills it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from retrieval.records import LabelKey
from retrieval.storage import atomic_write_text

READING_FILE = "reading.json"
PRESENT_PRECISION = 0.7  # out-of-fold precision a "present" (unhedged) statement needs
Side = Literal["left", "right", "bilateral"]


@dataclass(frozen=True)
class LabelCalibration:
    """One probe label's calibration and decision thresholds (all on the calibrated scale)."""

    key: str  # "coarse anatomy|finding"
    a: float  # Platt slope on the probe logit
    b: float  # Platt intercept
    uncertain_at: float
    present_at: float | None
    noise: float
    oof_auc: float | None = None  # out-of-fold AUC of the probe inside the training images
    positives: int = 0  # training images carrying the label

    def calibrate(self, logit: float) -> float:
        return float(self.probabilities(np.asarray(logit)))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of an array of probe logits (any shape)."""
        z = np.clip(self.a * np.asarray(logits, dtype=np.float64) + self.b, -50.0, 50.0)
        return np.asarray(1.0 / (1.0 + np.exp(-z)))


@dataclass(frozen=True)
class ReadingCalibration:
    labels: tuple[LabelCalibration, ...]
    protocol: str = ""  # how the numbers were chosen (for the record and the docs)
    images: int = 0  # training images they came from

    def by_key(self) -> dict[str, LabelCalibration]:
        return {c.key: c for c in self.labels}

    def save(self, checkpoint: str | Path) -> Path:
        path = Path(checkpoint) / READING_FILE
        atomic_write_text(path, json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, checkpoint: str | Path) -> ReadingCalibration | None:
        path = Path(checkpoint) / READING_FILE
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        return cls(tuple(LabelCalibration(**c) for c in raw["labels"]), raw.get("protocol", ""),
                   int(raw.get("images", 0)))


@dataclass(frozen=True)
class FindingProbability:
    key: LabelKey
    probability: float  # calibrated
    uncertain_at: float
    present_at: float | None
    noise: float

    @property
    def status(self) -> Literal["present", "uncertain", "absent"]:
        if self.present_at is not None and self.probability >= self.present_at:
            return "present"
        return "uncertain" if self.probability >= self.uncertain_at else "absent"


@dataclass(frozen=True)
class FindingReading:
    """What one image (or the mean over a study's images) reads as showing."""

    findings: dict[LabelKey, FindingProbability]
    sides: dict[LabelKey, Side] = field(default_factory=dict)  # empty: this encoder reads no side

    def get(self, key: LabelKey) -> FindingProbability | None:
        return self.findings.get(key)


@runtime_checkable
class FindingReader(Protocol):
    """An image encoder that reads findings off the pixels with calibrated probabilities."""

    def read_findings(self, images: list[np.ndarray]) -> FindingReading | None:
        """The study's reading (images averaged), or None when this checkpoint has no calibration."""
        ...


def reading_from_logits(logits: np.ndarray, keys: tuple[str, ...], cal: ReadingCalibration) -> FindingReading:
    """Mean probe logits of a study's images -> its calibrated reading (labels without a
    calibration, such as the normal column, are left out)."""
    by = cal.by_key()
    out: dict[LabelKey, FindingProbability] = {}
    for key, logit in zip(keys, np.asarray(logits, dtype=np.float64).reshape(-1), strict=True):
        c = by.get(key)
        if c is None or "|" not in key:
            continue
        anatomy, finding = key.split("|", 1)
        k = LabelKey(anatomy, finding)
        out[k] = FindingProbability(k, c.calibrate(float(logit)), c.uncertain_at, c.present_at, c.noise)
    return FindingReading(out)
