"""Perturbations of a fixed L2 size in [0, 1] pixel space, with clipping (Rusak et al. 2020)."""

from __future__ import annotations

import torch


def clipped_l2_norm(x: torch.Tensor, direction: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """``||clip(x + eta * direction, 0, 1) - x||_2`` per sample, for per-sample scalars ``eta`` (B,)."""
    moved = (x + eta.view(-1, *[1] * (x.ndim - 1)) * direction).clamp(0, 1)
    return (moved - x).flatten(1).norm(dim=1)


def clipping_aware_scale(x: torch.Tensor, direction: torch.Tensor, eps: torch.Tensor | float) -> torch.Tensor:
    """Per sample the scalar eta >= 0 with ``||clip(x + eta d, 0, 1) - x||_2 = eps`` (Rusak et al.,
    footnote 3, after Rauber & Bethge 2020).

    Coordinate i moves by ``min(eta |d_i|, room_i)``, room_i = 1 - x_i for d_i > 0 and x_i for
    d_i < 0, so it saturates at ``t_i = room_i / |d_i|``. The squared norm
    ``S(eta) = eta^2 sum_{t_i > eta} d_i^2 + sum_{t_i <= eta} room_i^2`` is piecewise linear in eta^2:
    sort the t_i, evaluate S at every breakpoint, and solve the linear piece that crosses eps^2.
    When even full saturation is smaller than eps (the direction cannot reach that size), eta is
    the last breakpoint, i.e. the largest reachable norm.
    """
    b = x.shape[0]
    x, d = x.flatten(1).double(), direction.flatten(1).double()
    eps = torch.as_tensor(eps, dtype=torch.float64, device=x.device).expand(b)
    room = torch.where(d > 0, 1 - x, torch.where(d < 0, x, torch.zeros_like(x)))
    d2 = d * d
    moving = d2 > 0
    t = torch.where(moving, room / d.abs().clamp_min(1e-300), torch.full_like(x, float("inf")))
    t, order = torch.sort(t, dim=1)
    d2, room2 = d2.gather(1, order), (room * room).gather(1, order)
    # at breakpoint k (eta = t_k): coordinates < k saturated, the others still move
    saturated_sum = torch.cumsum(room2, dim=1) - room2          # sum over j < k of room_j^2
    moving_sum = d2.flip(1).cumsum(1).flip(1)                    # sum over j >= k of d_j^2
    finite_t = torch.where(torch.isfinite(t), t, torch.zeros_like(t))
    s_at = finite_t * finite_t * moving_sum + saturated_sum     # S(t_k) (non-decreasing in k)
    target = (eps * eps).view(-1, 1)
    # first breakpoint whose S reaches the target: the crossing lies in the piece before it
    reached = (s_at >= target) & torch.isfinite(t)
    k = torch.where(reached.any(1), reached.float().argmax(1), torch.full((b,), -1, device=x.device))
    eta = torch.empty(b, dtype=torch.float64, device=x.device)
    # eta^2 = (eps^2 - saturated_sum_k) / moving_sum_k on the piece ending at t_k
    kk = k.clamp_min(0).view(-1, 1)
    sat_k, mov_k = saturated_sum.gather(1, kk).squeeze(1), moving_sum.gather(1, kk).squeeze(1)
    inside = k >= 0
    eta[inside] = ((eps[inside] ** 2 - sat_k[inside]).clamp_min(0) / mov_k[inside].clamp_min(1e-300)).sqrt()
    # unreachable: saturate everything that moves
    last = torch.where(torch.isfinite(t), t, torch.zeros_like(t)).amax(1)
    eta[~inside] = last[~inside]
    return eta.to(direction.dtype)


def rescale_to_l2(x: torch.Tensor, direction: torch.Tensor, eps: torch.Tensor | float) -> torch.Tensor:
    """``clip(x + eta d, 0, 1)`` with eta from :func:`clipping_aware_scale`: the perturbed images
    whose perturbation has L2 norm ``eps`` (or the largest norm the direction can reach)."""
    eta = clipping_aware_scale(x, direction, eps)
    return (x + eta.view(-1, *[1] * (x.ndim - 1)) * direction).clamp(0, 1)
