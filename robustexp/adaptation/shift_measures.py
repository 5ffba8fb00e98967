"""Covariate-shift statistics of Schneider et al. 2020, "Improving robustness against common
corruptions by covariate shift adaptation" (NeurIPS 2020).

* :func:`gaussian_w2`, :func:`layer_w2`, :func:`layer_shift`, :func:`mean_shift`: the Wasserstein
  distance between the source (training) and target (corrupted) BatchNorm statistics that the
  paper correlates with the top-1 error (Sec. 5, Fig. 3). Footnote 3 of the paper: each
  channel's activations are taken to be Gaussian, fully described by their mean and variance.
* :func:`prop1_bounds`, :func:`best_prior_strength`: Proposition 1 (Sec. 6), lower and upper
  bounds L <= E[W2^2] <= U on the expected squared W2 distance between the true target
  statistics and the statistics of eq. 3 (source prior with N pseudo-samples mixed with the
  biased estimates from n target samples), and the prior strength N that minimizes them.

All functions take numpy arrays, torch tensors or floats and compute in float64 numpy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def gaussian_w2(mu_s, var_s, mu_t, var_t, normalized: bool = True, eps: float = 0.0) -> np.ndarray:
    """Per-channel 2-Wasserstein distance between N(mu_s, var_s) and N(mu_t, var_t).

    For one-dimensional Gaussians ``W2^2 = (mu_s - mu_t)^2 + (sigma_s - sigma_t)^2``
    (sigma = sqrt(var)); this is the unnormalized distance (``normalized=False``).

    Schneider et al. report a *normalized* distance defined in their appendix A, which is not in
    our copy of the paper. Here **normalized** is the distance after applying the source
    normalization ``z -> (z - mu_s) / sigma_s`` to both distributions, i.e. the distance between
    N(0, 1) and N((mu_t - mu_s) / sigma_s, var_t / var_s)::

        W2_norm^2 = ((mu_t - mu_s) / sigma_s)^2 + (sigma_t / sigma_s - 1)^2 = W2^2 / var_s

    ``eps`` (default 0) is added to the source variance in the normalization only,
    ``sigma_s = sqrt(var_s + eps)``, as a BatchNorm layer with that ``eps`` normalizes; it keeps
    channels with a zero source variance finite. Both distances are returned per channel (same
    shape as the broadcast inputs); :func:`layer_w2` reduces them to a layer's distance.
    """
    mu_s, var_s, mu_t, var_t = (_np(v) for v in (mu_s, var_s, mu_t, var_t))
    if np.any(var_s < 0) or np.any(var_t < 0):
        raise ValueError("variances must be >= 0")
    w2_sq = (mu_s - mu_t) ** 2 + (np.sqrt(var_s) - np.sqrt(var_t)) ** 2
    if normalized:
        w2_sq = w2_sq / (var_s + eps)
    return np.sqrt(w2_sq)


def layer_w2(mu_s, var_s, mu_t, var_t, normalized: bool = True, eps: float = 0.0) -> float:
    """A layer's distance: the square root of the mean over channels of the per-channel W2^2 of
    :func:`gaussian_w2`, ``sqrt(mean_c W2_c^2)`` (normalized or not)."""
    per_channel = gaussian_w2(mu_s, var_s, mu_t, var_t, normalized=normalized, eps=eps)
    return float(np.sqrt(np.mean(per_channel ** 2)))


def layer_shift(source_stats: Mapping[str, Sequence], target_stats: Mapping[str, Sequence],
                normalized: bool = True, eps: float | Mapping[str, float] = 0.0) -> dict[str, float]:
    """``{layer name: distance}`` (:func:`layer_w2`) for every layer of ``source_stats``.

    ``source_stats[name]`` and ``target_stats[name]`` are ``(mean, variance)`` per channel
    (for BatchNorm layers: the running buffers before adaptation, and the statistics of the
    target data). ``eps``: one value, or one per layer name (a BN layer's ``eps``).
    """
    missing = [name for name in source_stats if name not in target_stats]
    if missing:
        raise KeyError(f"no target statistics for layers {missing}")
    out = {}
    for name, (mu_s, var_s) in source_stats.items():
        mu_t, var_t = target_stats[name]
        layer_eps = eps[name] if isinstance(eps, Mapping) else eps
        out[name] = layer_w2(mu_s, var_s, mu_t, var_t, normalized=normalized, eps=layer_eps)
    return out


def mean_shift(per_layer: Mapping[str, float]) -> float:
    """The distance averaged over layers (Schneider et al., Fig. 3 i-iii: "averaged across all
    network layers"), a plain mean of the per-layer distances of :func:`layer_shift`."""
    if not per_layer:
        raise ValueError("no layers to average")
    return float(np.mean(list(per_layer.values())))


def _chi2_left_tail(alpha: float, dof: int) -> float:
    from scipy.stats import chi2

    return float(chi2.ppf(alpha / 2.0, dof))


def prop1_bounds(N, n: int, mu_s, var_s, mu_t, var_t, alpha: float = 0.05):
    """Bounds (L, U) on E[W2^2(mu_bar, sigma_bar, mu_t, sigma_t)], Proposition 1 of Schneider et al.

    The target statistics are estimated from n samples (biased estimates: sample mean and
    variance divided by n) and mixed with the source statistics by eq. 3,
    ``mu_bar = N/(N+n) mu_s + n/(N+n) mu_hat_t`` and likewise for the variance; the expectation
    is over the sample mean and variance. With w = N/(N+n)::

        L = (sigma_t - sqrt(w sigma_s^2 + (n-1)/(N+n) sigma_t^2))^2 + w^2 (mu_t - mu_s)^2
            + n/(N+n)^2 sigma_t^2
        U = L + sigma_t^5 (n-1) / (2 (N+n)^2)
                * (w sigma_s^2 + chi2_{1-alpha/2,n-1} sigma_t^2 / (N+n))^(-3/2)

    ``chi2_{1-alpha/2,n-1}`` is the left tail value of the chi-square distribution with n - 1
    degrees of freedom, P(X <= chi2) = alpha/2 (``scipy.stats.chi2.ppf(alpha/2, n-1)``); U holds
    at confidence level 1 - alpha. For n = 1 the estimated variance is 0 for certain, so U = L.

    ``N`` may be a number or an array (N = inf: the source statistics alone). ``mu_s, var_s,
    mu_t, var_t`` may be numbers or per-channel arrays; with arrays the bounds are averaged over
    channels. Returns L and U with the shape of ``N`` (floats for a scalar N).
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    N_arr = _np(N)
    if np.any(N_arr < 0):
        raise ValueError("prior strength N must be >= 0")
    mu_s, var_s, mu_t, var_t = (np.atleast_1d(_np(v)) for v in (mu_s, var_s, mu_t, var_t))
    Nc = N_arr[..., None]  # broadcast N against channels (last axis)
    infinite = np.isinf(Nc)
    total = Nc + n
    w = np.where(infinite, 1.0, Nc / np.where(infinite, 1.0, total))  # N / (N+n), 1 at N = inf
    inv = 1.0 / total                                                  # 1 / (N+n), 0 at N = inf
    sigma_t = np.sqrt(var_t)
    lower = ((sigma_t - np.sqrt(w * var_s + (n - 1) * inv * var_t)) ** 2 + w ** 2 * (mu_t - mu_s) ** 2
             + n * inv ** 2 * var_t)
    if n == 1:
        upper = lower
    else:
        chi2 = _chi2_left_tail(alpha, n - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            gap = sigma_t ** 5 * (n - 1) * inv ** 2 / 2.0 * (w * var_s + inv * chi2 * var_t) ** -1.5
        upper = lower + np.where(infinite, 0.0, gap)
    L, U = lower.mean(-1), upper.mean(-1)
    if N_arr.ndim == 0:
        return float(L), float(U)
    return L, U


def best_prior_strength(n: int, mu_s, var_s, mu_t, var_t, alpha: float = 0.05, N_grid=None):
    """The prior strengths N of ``N_grid`` that minimize L and U of :func:`prop1_bounds`
    (Schneider et al., Sec. 6 and Fig. 5: "Choosing N such that L or U are minimized").

    ``N_grid`` defaults to 0 and 200 log-spaced values from 1 to 1e6. Returns ``(N_L, N_U)``,
    two values of the grid (the first one where there are ties).
    """
    grid = np.concatenate([[0.0], np.logspace(0, 6, 200)]) if N_grid is None else _np(N_grid).ravel()
    if grid.size == 0:
        raise ValueError("N_grid is empty")
    L, U = prop1_bounds(grid, n, mu_s, var_s, mu_t, var_t, alpha=alpha)
    return float(grid[int(np.nanargmin(L))]), float(grid[int(np.nanargmin(U))])
