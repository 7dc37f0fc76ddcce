"""A slow, literal Anon written from the math in ``shared/anon-notes.md`` section 1, one scalar at a time.

It shares no code with ``anon_hf``: the refresh schedule, the bias corrections and the harmonic-mean update
are spelled out again here with Python floats, and the preconditioner is kept as ``u`` (not as ``v``).
Tests step it beside ``anon_hf.Anon`` on the same gradients and compare.
"""

from __future__ import annotations

import math


def _is_refresh(t: int, refresh) -> bool:
    if refresh == "pow2":
        return t in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    if refresh == "every":
        return True
    return t == 1 or t % refresh == 0


class ReferenceAnon:
    """Anon over flat lists of Python floats: ``params[k][j]`` is element j of tensor k."""

    def __init__(
        self,
        params: list[list[float]],
        *,
        lr: float,
        betas=(0.9, 0.999),
        gamma: float = 1.0,
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        refresh="pow2",
        beta3: float = 0.5,
        bounds=None,
        maximize: bool = False,
        keep_unseen: bool = True,
        max_precond_ratio: float | None = 10.0,
    ):
        self.params = [list(p) for p in params]
        self.lr, (self.b1, self.b2), self.gamma, self.eps = lr, betas, gamma, eps
        self.wd, self.decoupled, self.refresh, self.beta3 = weight_decay, decoupled_weight_decay, refresh, beta3
        self.bounds, self.maximize, self.keep_unseen = bounds, maximize, keep_unseen
        self.max_ratio = max_precond_ratio
        self.m = [[0.0] * len(p) for p in params]
        self.s = [[0.0] * len(p) for p in params]
        self.u = [[None] * len(p) for p in params]
        self.t = 0
        self.t_prev = 0
        self.refreshes: list[int] = []

    def step(self, grads: list[list[float]]) -> None:
        self.t += 1
        t = self.t
        refresh = _is_refresh(t, self.refresh)
        if refresh:
            self.refreshes.append(t)
        for k, param in enumerate(self.params):
            for j, theta in enumerate(param):
                g = -grads[k][j] if self.maximize else grads[k][j]
                if self.wd and not self.decoupled:
                    g += self.wd * theta
                if self.wd and self.decoupled:
                    theta *= 1 - self.lr * self.wd
                self.m[k][j] = self.b1 * self.m[k][j] + (1 - self.b1) * g
                self.s[k][j] = self.b2 * self.s[k][j] + (1 - self.b2) * g * g
                # keep_unseen: no gradient since the last refresh keeps u; None (never refreshed with a gradient,
                # v = 0) starts the mean. Without it, the published rule: every element refreshes.
                if refresh and not (self.keep_unseen and self.s[k][j] == 0.0):
                    sigma = self.s[k][j] / (1 - self.b2 ** (t - self.t_prev)) + self.eps
                    new = sigma**self.gamma
                    prev = self.u[k][j]
                    self.u[k][j] = new if prev is None else self.beta3 * prev + (1 - self.beta3) * new
                if refresh:
                    self.s[k][j] = 0.0
                if self.gamma == 0:  # sigma**0 == 1: no preconditioner at all, whatever the gradients
                    v = 1.0
                else:
                    v = 0.0 if self.u[k][j] is None else self.u[k][j] ** -0.5
                    if not refresh:
                        v = self._between_refreshes(v, self.s[k][j], t)
                theta -= self.lr * v * self.m[k][j] / (1 - self.b1**t)
                if self.bounds is not None:
                    lo, hi = self.bounds
                    theta = max(lo, theta) if lo is not None else theta
                    theta = min(hi, theta) if hi is not None else theta
                param[j] = theta
        if refresh:
            self.t_prev = t

    def _between_refreshes(self, v: float, s: float, t: int) -> float:
        """What a step between refreshes multiplies m by. keep_unseen: an element no refresh has seen a gradient of
        (v == 0) takes sigma_t**(-gamma/2) over the gradients since the last refresh as soon as it has one (s > 0),
        for every gamma, and stays still without one. Elsewhere, for gamma > 0, the limit
        min(v, max_ratio * sigma_t**(-gamma/2))."""
        if self.keep_unseen and v == 0.0:
            return self._window_power(s, t) if s > 0.0 else 0.0
        if self.max_ratio is not None and self.gamma > 0:
            return min(v, self.max_ratio * self._window_power(s, t))
        return v

    def _window_power(self, s: float, t: int) -> float:
        """sigma**(-gamma/2) for the gradients since the last refresh (inf where a float cannot hold it)."""
        sigma = s / (1 - self.b2 ** (t - self.t_prev)) + self.eps
        exponent = -0.5 * self.gamma * math.log(sigma)
        return math.inf if exponent > 709.0 else math.exp(exponent)

    def preconditioner(self, k: int) -> list[float]:
        return [0.0 if u is None else u**-0.5 for u in self.u[k]]


def gradient_sequence(shapes_numel: list[int], steps: int, seed: int = 0) -> list[list[list[float]]]:
    """Deterministic gradients, some entries exactly zero and a wide spread of magnitudes."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        step = []
        for n in shapes_numel:
            step.append([0.0 if rng.random() < 0.05 else rng.gauss(0, 1) * 10 ** rng.uniform(-3, 1) for _ in range(n)])
        out.append(step)
    return out


def quadratic_grad(theta: float, noise: float, curvature: float) -> float:
    """The gradient of 0.5 * curvature * theta**2 plus noise: ties each gradient to the trajectory."""
    return curvature * theta + noise


def curvatures(numel: int, seed: int) -> list[float]:
    return [0.5 + math.sin(seed + j) ** 2 for j in range(numel)]


def run_beside_reference(optimizer, params, init, steps: int, reference_cls=None, **reference_kwargs) -> ReferenceAnon:
    """Step ``optimizer`` over the torch ``params`` and a :class:`ReferenceAnon` side by side for ``steps`` steps.

    ``init`` holds the float64 starting values the params were made from. Each side computes its gradients from its
    own weights (``quadratic_grad`` with the same noise), so a difference in the update shows up in later steps.
    Returns the reference, for comparing weights and preconditioners. ``reference_cls`` replaces ReferenceAnon (e.g.
    ``reference8bit.ReferenceAnon8bit``).
    """
    import torch

    ref = (reference_cls or ReferenceAnon)([t.flatten().tolist() for t in init], **reference_kwargs)
    numels = [t.numel() for t in init]
    noises = gradient_sequence(numels, steps)
    curv = [curvatures(n, seed=k) for k, n in enumerate(numels)]
    for t in range(steps):
        ref_grads = [
            [quadratic_grad(theta, noises[t][k][j], curv[k][j]) for j, theta in enumerate(ref.params[k])]
            for k in range(len(init))
        ]
        for k, p in enumerate(params):
            noise = torch.tensor(noises[t][k], dtype=torch.float64).view_as(p)
            c = torch.tensor(curv[k], dtype=torch.float64).view_as(p)
            p.grad = (c * p.detach().double() + noise).to(p.dtype)
        optimizer.step()
        ref.step(ref_grads)
    return ref
