"""Compute-optimal model size and data for a FLOP budget, and the loss they predict.

Parametric loss (Hoffmann et al. 2022, "Chinchilla", Approach 3, eq. 2):
    L(N, D) = E + A / N^alpha + B / D^beta
minimised under C = 6·N·D (eq. 4):
    N_opt = G · (C/6)^a,  D_opt = (1/G) · (C/6)^b,
    G = (alpha·A / (beta·B))^(1/(alpha+beta)),  a = beta/(alpha+beta),  b = alpha/(alpha+beta).

Fits:
- "epoch2024" (default): Besiroglu et al. 2024, "Chinchilla Scaling: A replication
  attempt", Table 1 / eq. 3 refit of Approach 3 on the data recovered from Chinchilla's
  Figure 4. The published Approach 3 parameters are inconsistent with Approaches 1 and 2
  and with Chinchilla's own 70B / 1.4T choice: at Chinchilla's budget they imply a 32B
  model on 3T tokens (~90 tokens per parameter). The refit agrees with Approaches 1-2
  (about 20 tokens per parameter) and with Table 3 (see tests/test_feasibility.py).
- "chinchilla": Hoffmann et al. 2022 Approach 3 as published (E=1.69, A=406.4,
  B=410.7, alpha=0.34, beta=0.28).
- "tokens_per_param": the rule of thumb D = 20·N from Approaches 1-2 (Table 3); loss is
  predicted with the epoch2024 fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ScalingLaw = Literal["epoch2024", "chinchilla", "tokens_per_param"]
TOKENS_PER_PARAM = 20.0


@dataclass(frozen=True)
class LossFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, params: float, tokens: float) -> float:
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    def optimal(self, compute_flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) for C = 6ND (Hoffmann et al. 2022, eq. 4)."""
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        a = self.beta / (self.alpha + self.beta)
        b = self.alpha / (self.alpha + self.beta)
        return G * (compute_flops / 6.0) ** a, (compute_flops / 6.0) ** b / G


FITS = {
    "chinchilla": LossFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
    "epoch2024": LossFit(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658),
}


LAW_SOURCES: dict[str, str] = {
    "epoch2024": "Besiroglu et al. 2024 refit of Chinchilla Approach 3: L = 1.8172 + 482.01/N^0.3478 + "
                 "2085.43/D^0.3658, minimised under C = 6ND",
    "chinchilla": "Hoffmann et al. 2022 Approach 3 as published: L = 1.69 + 406.4/N^0.34 + 410.7/D^0.28, "
                  "minimised under C = 6ND",
    "tokens_per_param": "Hoffmann et al. 2022 Approaches 1-2: D = 20N under C = 6ND; loss from the epoch2024 fit",
}


def compute_optimal(compute_flops: float, law: ScalingLaw = "epoch2024") -> dict[str, float]:
    if law == "tokens_per_param":
        params = math.sqrt(compute_flops / (6.0 * TOKENS_PER_PARAM))
        tokens = TOKENS_PER_PARAM * params
        fit = FITS["epoch2024"]
    else:
        fit = FITS[law]
        params, tokens = fit.optimal(compute_flops)
    return {"params": params, "tokens": tokens, "predicted_loss": fit.loss(params, tokens)}
