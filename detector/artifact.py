"""Model directories: weights, learned reference data, scaling, calibration, thresholds, metrics.

A model directory is self-contained and named by its version. `models/current` is a symlink to
the version in use, so switching models is one atomic rename. Loading checks the format and the
feature list and refuses an artifact it cannot use, saying what to do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from detector.calibration import PlattScaler
from detector.features import FEATURE_NAMES
from detector.model import ScanLSTM
from detector.reference import Reference
from detector.schema import ANOMALY_TYPES

ARTIFACT_FORMAT = 1
WEIGHTS_FILE = "model.pt"
REFERENCE_FILE = "reference.json"
META_FILE = "meta.json"


class ModelUnavailable(RuntimeError):
    """No usable model where one was expected; the message says how to make one."""


@dataclass
class LoadedModel:
    version: str
    path: Path
    net: ScanLSTM
    reference: Reference
    scalers: dict[str, PlattScaler]
    thresholds: dict[str, float]
    meta: dict[str, Any]


def save_model(
    directory: Path,
    version: str,
    net: ScanLSTM,
    reference: Reference,
    scalers: dict[str, PlattScaler],
    thresholds: dict[str, float],
    metrics: dict[str, Any],
    training: dict[str, Any],
    masked_features: tuple[str, ...] = (),
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), directory / WEIGHTS_FILE)
    (directory / REFERENCE_FILE).write_text(json.dumps(reference.to_json(), indent=1))
    meta = {
        "format": ARTIFACT_FORMAT,
        "version": version,
        "feature_names": list(FEATURE_NAMES),
        "anomaly_types": list(ANOMALY_TYPES),
        "hidden_size": net.hidden_size,
        "masked_features": list(masked_features),
        "calibration": {t: [s.slope, s.intercept] for t, s in scalers.items()},
        "thresholds": thresholds,
        "metrics": metrics,
        "training": training,
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=1))
    return directory


def load_model(directory: Path) -> LoadedModel:
    """Load a model directory or raise `ModelUnavailable` with what to do about it."""
    meta_path = directory / META_FILE
    if not meta_path.exists():
        raise ModelUnavailable(
            f"no model at {directory} — run `epcwatch train HISTORY_FILE` first "
            "(or `epcwatch train --simulate` for a demo model)"
        )
    try:
        meta = json.loads(meta_path.read_text())
        reference = Reference.from_json(json.loads((directory / REFERENCE_FILE).read_text()))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelUnavailable(f"model at {directory} is unreadable ({exc}); retrain it") from exc
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ModelUnavailable(
            f"model at {directory} has format {meta.get('format')}, this epcwatch reads "
            f"{ARTIFACT_FORMAT}; retrain it with this version"
        )
    if meta.get("feature_names") != list(FEATURE_NAMES) or meta.get("anomaly_types") != list(
        ANOMALY_TYPES
    ):
        raise ModelUnavailable(
            f"model at {directory} was trained on other features; retrain it with this version"
        )
    masked = meta.get("masked_features", [])
    unknown = [name for name in masked if name not in FEATURE_NAMES]
    if unknown:
        raise ModelUnavailable(
            f"model at {directory} masks unknown features {unknown}; retrain it with this version"
        )
    net = ScanLSTM(
        len(FEATURE_NAMES),
        int(meta["hidden_size"]),
        tuple(FEATURE_NAMES.index(name) for name in masked),
    )
    try:
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as exc:  # torch raises many kinds on a damaged file; all mean "unusable"
        raise ModelUnavailable(f"weights at {directory} do not load ({exc}); retrain") from exc
    net.eval()
    scalers = {t: PlattScaler(*meta["calibration"][t]) for t in ANOMALY_TYPES}
    return LoadedModel(
        version=str(meta["version"]),
        path=directory,
        net=net,
        reference=reference,
        scalers=scalers,
        thresholds={t: float(meta["thresholds"][t]) for t in ANOMALY_TYPES},
        meta=meta,
    )


def promote(models_root: Path, version: str) -> Path:
    """Point `models_root/current` at `version` atomically."""
    target = models_root / version
    if not (target / META_FILE).exists():
        raise ModelUnavailable(f"no model version {version} under {models_root}")
    link = models_root / "current"
    tmp = models_root / f".current.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(version)
    os.replace(tmp, link)
    return link
