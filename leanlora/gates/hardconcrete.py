"""Hard-concrete (L0) gates (arXiv:1712.01312), as Bayesian Bits and B-LoRA use them.

A gate has one learnable location ``log_alpha``. With the stretch (gamma, zeta) = (-0.1, 1.1) and
temperature beta = 2/3 (the constants of both papers and of the B-LoRA code):

    training:  u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
               z = clamp(s (zeta - gamma) + gamma, 0, 1)                      (sample)
    P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))                  (prob_open)
    P(z == 1) = sigmoid(log_alpha - beta log((1 - gamma) / (zeta - 1)))       (prob_one)
    eval:      z = 1[P(z == 0) < threshold]                                   (deterministic)

The eval rule is Bayesian Bits' (threshold 0.34): a gate is kept when the probability that its
sample is exactly zero is below the threshold. All functions are elementwise over any shape and
free of host synchronisation, so they trace under ``torch.compile``.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
THRESHOLD = 0.34
# beta·log(-gamma/zeta): the log-alpha at which P(z != 0) = 1/2 is minus this (about -1.60).
_OPEN_SHIFT = BETA * math.log(-GAMMA / ZETA)
_ONE_SHIFT = BETA * math.log((1.0 - GAMMA) / (ZETA - 1.0))
_EPS = 1e-6  # keeps log u and log(1 - u) finite


def sample(log_alpha: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """One hard-concrete draw per gate: z in [0, 1], same shape as ``log_alpha``.

    ``u`` (uniform in (0, 1), same shape) may be given for reproducible tests.
    """
    u = (torch.rand_like(log_alpha) if u is None else u).clamp(_EPS, 1.0 - _EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def prob_open(log_alpha: torch.Tensor) -> torch.Tensor:
    """q = P(z != 0), the probability that a gate lets anything through (differentiable)."""
    return torch.sigmoid(log_alpha - _OPEN_SHIFT)


def open_chain(log_alpha: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """q_1, q_1 q_2, ..., q_1···q_K along ``dim``: the probabilities that each prefix of a gate chain is open.

    Computed as exp(cumsum(log q)) with log q = logsigmoid(·): the same values as
    ``cumprod(prob_open(·))`` (q never reaches 0), but whose backward is three small kernels
    where cumprod's, which must allow for zeros, takes about twenty (the gate prior evaluates
    one chain per gate vector, stacked over the model in :mod:`leanlora.gates.priors`).
    """
    return torch.exp(torch.cumsum(F.logsigmoid(log_alpha - _OPEN_SHIFT), dim))


def prefix_product(z: torch.Tensor) -> torch.Tensor:
    """z_1, z_1 z_2, ..., z_1···z_K along the last dim (= ``torch.cumprod(z, -1)``), for gate samples.

    On CUDA and under ``torch.compile`` the products are unrolled. cumprod's backward asks the
    device whether any input is zero and waits for the answer: a host synchronisation per gate
    chain per step, which also makes a training step impossible to capture as a CUDA graph
    (:mod:`leanlora.train.step_graph`). Compiled, a scan is its own kernel and its zero-safe
    backward a dozen more, where K multiplications fuse into the gate sampling and the quantizer
    around them. Gate chains are short (K < r, K < 5 for bits). On the CPU cumprod is one call.
    """
    if z.shape[-1] <= 1 or not (z.is_cuda or torch.compiler.is_compiling()):
        return torch.cumprod(z, -1)
    return torch.stack(list(itertools.accumulate(z.unbind(-1), torch.mul)), -1)


def prob_one(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z == 1), the probability of a fully open sample (closed form, used by tests)."""
    return torch.sigmoid(log_alpha - _ONE_SHIFT)


def deterministic(log_alpha: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """Eval gate in {0, 1}: open when P(z == 0) = 1 - q < threshold; float, same shape."""
    return ((1.0 - prob_open(log_alpha)) < threshold).to(log_alpha.dtype)


def log_alpha_for(q: float) -> float:
    """The location whose open probability P(z != 0) is ``q`` (inverse of :func:`prob_open`)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q={q!r} is invalid: must be in (0, 1)")
    return math.log(q / (1.0 - q)) + _OPEN_SHIFT


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()
