"""Routers: the MetaRouter gate of layer 1, the `Router` protocol of layers 2..L-1 and its two routers
(the entropy SpectralRouter, the three-operator router), and the RBF operator."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor, nn

from .config import ChiarConfig
from .operators import Operator

GATE_OPEN = 0.5  # the MetaRouter's hard gate: layer 1 mixes a token (DCT) iff its gate g >= GATE_OPEN


class MetaRouter(nn.Module):
    """g_t = sigmoid(w . m_t + b) with m_t the causal running mean of the sequence's embeddings.

    Per sequence and causal (deviation from the paper's batch mean): a request's output must not
    depend on its batch neighbours or on future tokens. Hard gate: open iff g_t >= GATE_OPEN.
    """

    def __init__(self, d_model: int, bias_init: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_model))
        self.bias = nn.Parameter(torch.tensor(float(bias_init)))

    def gate_from_mean(self, running_mean: Tensor) -> Tensor:
        return torch.sigmoid(running_mean @ self.weight.to(running_mean.dtype) + self.bias.to(running_mean.dtype))

    def forward(self, embeddings: Tensor) -> Tensor:
        """embeddings [B, T, d] -> gate [B, T]."""
        steps = torch.arange(1, embeddings.shape[1] + 1, device=embeddings.device, dtype=embeddings.dtype)
        return self.gate_from_mean(embeddings.cumsum(dim=1) / steps[:, None])


class Router(Protocol):
    """What a routing layer asks of its router; nothing outside a router branches on its class."""

    operators: tuple[Operator, ...]  # the operators it chooses between, in `probabilities` order

    def decide(self, u: Tensor, entropy: Tensor) -> Tensor:
        """Operator id per token (int8): the hard choice both forward paths run."""
        ...

    def probabilities(self, u: Tensor, entropy: Tensor) -> Tensor:
        """[..., len(operators)] soft weights the reference path blends with (or carries the STE gradient by)."""
        ...

    def entropy_threshold(self) -> float | None:
        """The tau of a decision that is a threshold on the entropy alone (the native kernels then decide it)."""
        ...

    def projection(self) -> nn.Linear | None:
        """A learned projection of u the decision also reads (packed by the native kernels), if any."""
        ...

    def cut_points(self) -> list[float]:
        """The entropy values the decision compares with, ascending (what the API reports per layer)."""
        ...

    def set_cut_points(self, values: list[float]) -> None:
        """Move the cut points (calibration of random-weight models in tests and benchmarks)."""
        ...


class SpectralRouter(nn.Module):
    """Token -> attention if H >= tau, else DCT mixing; soft share sigmoid((H - tau) / T). A `Router`."""

    operators = (Operator.DCT, Operator.ATTENTION)

    def __init__(self, threshold: float, temperature: float, learnable: bool) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(float(threshold)), requires_grad=learnable)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learnable)

    def soft_share(self, entropy: Tensor) -> Tensor:
        """Probability-like attention share per token."""
        tau = self.threshold.to(entropy.dtype)
        return torch.sigmoid((entropy - tau) / self.log_temperature.exp().to(entropy.dtype))

    def decide(self, u: Tensor, entropy: Tensor) -> Tensor:
        """Operator id per token (int8): ATTENTION where H >= tau, else DCT."""
        del u  # the entropy alone decides
        return torch.where(entropy >= self.threshold.to(entropy.dtype), int(Operator.ATTENTION), int(Operator.DCT)).to(torch.int8)

    def entropy_threshold(self) -> float | None:
        return float(self.threshold)

    def projection(self) -> nn.Linear | None:
        return None

    def cut_points(self) -> list[float]:
        return [float(self.threshold.detach())]

    @torch.no_grad()
    def set_cut_points(self, values: list[float]) -> None:
        (tau,) = values
        self.threshold.fill_(tau)

    def probabilities(self, u: Tensor, entropy: Tensor) -> Tensor:
        """[..., 2] soft weights over `operators` (DCT, attention)."""
        del u
        share = self.soft_share(entropy)
        return torch.stack([1 - share, share], -1)


# Operator order of the three-operator router's logits.
THREE_WAY_ORDER = (Operator.DCT, Operator.RBF, Operator.ATTENTION)


class ThreeWayRouter(nn.Module):
    """Learnable DCT / RBF / attention router initialised to the entropy bands of the paper's v1.

    logits = W u + [(p33 - H) / T, 0, (H - p67) / T] with W = 0 at init, so argmax is exactly
    H < p33 -> DCT, p33 <= H < p67 -> RBF, H >= p67 -> attention; W and the band edges learn. A `Router`.
    """

    operators = THREE_WAY_ORDER

    def __init__(self, d_model: int, band: tuple[float, float], temperature: float, learnable: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, 3)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.band = nn.Parameter(torch.tensor([float(band[0]), float(band[1])]), requires_grad=learnable)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learnable)
        for p in self.proj.parameters():
            p.requires_grad_(learnable)

    def logits(self, u: Tensor, entropy: Tensor, projected: Tensor | None = None) -> Tensor:
        """u [..., d], entropy [...] -> [..., 3] in THREE_WAY_ORDER; `projected`: proj(u) computed elsewhere."""
        band = self.band.to(entropy.dtype)
        temperature = self.log_temperature.exp().to(entropy.dtype)
        prior = torch.stack([(band[0] - entropy) / temperature, torch.zeros_like(entropy), (entropy - band[1]) / temperature], -1)
        return (self.proj(u) if projected is None else projected).to(entropy.dtype) + prior

    def decide(self, u: Tensor, entropy: Tensor, projected: Tensor | None = None) -> Tensor:
        """Operator id per token (int8): the argmax of the logits."""
        ids = torch.tensor([int(op) for op in THREE_WAY_ORDER], dtype=torch.int8, device=u.device)
        return ids[self.logits(u, entropy, projected).argmax(-1)]

    def entropy_threshold(self) -> float | None:
        return None  # the decision reads u too (the learned projection)

    def projection(self) -> nn.Linear | None:
        """The learned projection of u the decision adds to the entropy prior."""
        return self.proj

    def cut_points(self) -> list[float]:
        """The band (p33, p67) of the entropy prior; the learned projection also votes."""
        return [float(v) for v in self.band.detach()]

    @torch.no_grad()
    def set_cut_points(self, values: list[float]) -> None:
        self.band.copy_(torch.tensor(values, dtype=self.band.dtype))

    def probabilities(self, u: Tensor, entropy: Tensor) -> Tensor:
        """[..., 3] softmax of the logits, in THREE_WAY_ORDER."""
        return self.logits(u, entropy).softmax(-1)


class RBFLayer(nn.Module):
    """Token-local radial-basis-function layer: y = sum_j exp(-||x - c_j||^2 / (2 s_j^2)) v_j."""

    def __init__(self, d_model: int, n_centers: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(n_centers, d_model))
        self.log_scale = nn.Parameter(torch.full((n_centers,), 0.5 * math.log(d_model)))
        self.values = nn.Parameter(torch.randn(n_centers, d_model) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.weights(x, x @ self.centers.T) @ self.values

    def weights(self, x: Tensor, cross: Tensor) -> Tensor:
        """The radial weights of each token, given cross = x @ centers^T."""
        sq_dist = (x.square().sum(-1, keepdim=True) - 2 * cross + self.centers.square().sum(-1)).clamp_min(0)
        return torch.exp(-sq_dist / (2 * torch.exp(2 * self.log_scale)))


UNCALIBRATED_BAND = 0.05  # a three-operator layer with a threshold but no band: (tau - this, tau + this)


def make_router(config: ChiarConfig, layer: int) -> SpectralRouter | ThreeWayRouter:
    """Router for routing layer `layer` (0-based among routing layers)."""
    learnable = config.routing in ("soft", "ste")
    if config.three_operators:
        if config.bands is not None:
            band = tuple(config.bands[layer])
        else:
            tau = config.resolved_thresholds()[layer]
            band = (tau - UNCALIBRATED_BAND, tau + UNCALIBRATED_BAND)
        return ThreeWayRouter(config.d_model, band, config.temperature, learnable)  # type: ignore[arg-type]
    return SpectralRouter(config.resolved_thresholds()[layer], config.temperature, learnable)
