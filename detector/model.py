"""The LSTM that scores each scan in the context of its EPC's earlier scans.

A unidirectional LSTM reads an EPC's scans in arrival order and emits one logit per anomaly type
per scan. Training runs it over whole journeys; the streaming inferencer runs `step`, carrying
each EPC's (h, c) between scans, so a new scan costs O(1) whatever the window length.

Masked features are zeroed before scaling, in training and at inference alike; the evaluation
uses this to train a model that never sees the rule checks (the "model-only" ablation).
"""

from __future__ import annotations

import torch
from torch import nn

from detector.schema import ANOMALY_TYPES


class ScanLSTM(nn.Module):
    """Feature scaling, one LSTM layer, and a linear head with one logit per anomaly type."""

    def __init__(self, n_features: int, hidden_size: int, masked: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.masked = tuple(masked)
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_scale", torch.ones(n_features))
        keep = torch.ones(n_features)
        keep[list(self.masked)] = 0.0
        # Not persistent: the artifact stores the masked feature names, not the mask.
        self.register_buffer("feature_keep", keep, persistent=False)
        self.lstm = nn.LSTM(n_features, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, len(ANOMALY_TYPES))

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.masked:
            x = x * self.feature_keep
        return (x - self.feature_mean) / self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for every scan of a batch of journeys: (batch, length, features) → (…, 5)."""
        out, _ = self.lstm(self.scale(x))
        return self.head(out)

    def step(
        self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One scan per row: (batch, features) plus carried (h, c) → logits, new h, new c."""
        lstm = self.lstm
        # The fused cell `nn.LSTMCell` runs, on this layer's weights (the same gate order).
        h_next, c_next = torch.lstm_cell(
            self.scale(x),
            (h, c),
            lstm.weight_ih_l0,
            lstm.weight_hh_l0,
            lstm.bias_ih_l0,
            lstm.bias_hh_l0,
        )
        return self.head(h_next), h_next, c_next
