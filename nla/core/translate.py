"""A linear translator from model A's activations to model B's: the baseline the cross-model NLA
channel is measured against (text from A's AV, read by B's AR).

Ridge regression in closed form: W = (XcᵀXc + λI)⁻¹ XcᵀYc on centred rows, b = ȳ − x̄W, solved in
float64. λ is chosen on held-out pairs from a grid scaled to the data (λ = s · tr(XcᵀXc)/d_A for s
in `SCALES`), by the validation MSE; then refit on train rows only (val only chooses). Its size per
vector is d_B floats, against an explanation's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4)  # the largest: nearly the mean alone


@dataclass
class Translator:
    weight: torch.Tensor  # [d_a, d_b] float64
    bias: torch.Tensor  # [d_b] float64
    ridge: float  # the λ chosen
    val_mse: dict[float, float]  # λ -> mean squared error on the validation pairs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[n, d_a] -> [n, d_b] in x's dtype."""
        return (x.double() @ self.weight + self.bias).to(x.dtype)


def fit_ridge(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, d_a], [n, d_b], λ -> (W [d_a, d_b], b [d_b]) in float64."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    weight = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc)
    return weight, my - mx @ weight


def fit_translator(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor) -> Translator:
    """The ridge translator with λ chosen by the validation pairs' MSE (module docstring)."""
    if len(x) != len(y) or len(x_val) != len(y_val) or len(x_val) == 0:
        raise ValueError("the translator needs paired train rows and at least one paired validation row.")
    xc = x.double() - x.double().mean(0)
    base = float((xc * xc).sum()) / x.shape[1]
    val_mse: dict[float, float] = {}
    fits = {}
    for s in SCALES:
        ridge = s * base
        w, b = fit_ridge(x, y, ridge)
        fits[ridge] = (w, b)
        val_mse[ridge] = float(((x_val.double() @ w + b - y_val.double()) ** 2).mean())
    best = min(val_mse, key=val_mse.get)
    return Translator(*fits[best], best, val_mse)
