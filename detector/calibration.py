"""Calibrated confidences: Platt scaling per anomaly type, fitted on held-out EPCs.

A confidence of 0.9 should mean that about nine in ten such alerts are real. The LSTM's raw
probabilities are not that, so each type gets `sigmoid(a * logit + b)` fitted by maximum
likelihood on the validation split, and its reliability is reported as expected calibration
error over equal-width bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PlattScaler:
    slope: float = 1.0
    intercept: float = 0.0

    def apply(self, logits: np.ndarray) -> np.ndarray:
        z = np.clip(self.slope * logits + self.intercept, -40.0, 40.0)
        return 1.0 / (1.0 + np.exp(-z))


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> PlattScaler:
    """Fit slope and intercept by L-BFGS on the log loss; falls back to identity if degenerate.

    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=4000) * 4
    >>> y = (rng.random(4000) < 1 / (1 + np.exp(-z / 2))).astype(float)
    >>> round(fit_platt(z, y).slope, 1)
    0.5
    """
    if labels.min() == labels.max():
        return PlattScaler()
    x = torch.tensor(logits, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.float64)
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([params], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(params[0] * x + params[1], y)
        value.backward()
        return value

    optimiser.step(loss)
    slope, intercept = params.detach().tolist()
    return PlattScaler(float(slope), float(intercept))


def reliability(
    confidence: np.ndarray, labels: np.ndarray, bins: int = 10
) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error and the table behind it (bins with at least one case).

    >>> ece, table = reliability(np.array([0.9, 0.9, 0.1, 0.1]), np.array([1, 1, 0, 0]))
    >>> round(ece, 2)
    0.1
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    table: list[dict[str, float]] = []
    ece = 0.0
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        if n == 0:
            continue
        mean_conf = float(confidence[mask].mean())
        real = float(labels[mask].mean())
        ece += n / len(confidence) * abs(mean_conf - real)
        table.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "n": n,
                "mean_confidence": mean_conf,
                "share_real": real,
            }
        )
    return float(ece), table
