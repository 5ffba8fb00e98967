"""Loss functions of the training methods and test-time adaptations, in one place (as timm keeps
its losses in ``timm.loss``): the divergences and the entropy are shared by several methods, and a
reader finds each paper's equation here. All are per example (shape (B,)); callers take the mean.

=====================  ==========================================================  ====================
function               formula                                                      used by
=====================  ==========================================================  ====================
:func:`kl_divergence`  KL(p || q) = sum_c p_c (log p_c - log q_c)                   MAGN, TRADES
:func:`trades_kl`      KL(p(x) || p(x')) (TRADES, MAGN paper eq. 3)                 TRADES
:func:`magn_regularizer`  [p(x)]_y KL(p(x) || p(x + delta)) (MAGN eq. 6)            MAGN
:func:`jensen_shannon`  (1/k) sum_i KL(p_i || M), M = mean_i p_i (AugMix, MAGN eq. 5)  AugMix, MAGN
:func:`softmax_entropy`  -sum_c p_c log p_c (Tent, Wang et al. eq. 1)               Tent
=====================  ==========================================================  ====================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-example ``KL(p || q) = sum_c p_c (log p_c - log q_c)`` from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def trades_kl(clean_logits: torch.Tensor, adversarial_logits: torch.Tensor) -> torch.Tensor:
    """Per-example TRADES robustness term ``KL(p(x) || p(x'))`` (Zhang et al. 2019; MAGN paper
    eq. 3), the clean distribution first."""
    return kl_divergence(F.log_softmax(clean_logits, dim=1), F.log_softmax(adversarial_logits, dim=1))


def magn_regularizer(clean_logits: torch.Tensor, noisy_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example MAGN term of eq. 6 (Tsiligkaridis & Tsiligkaridis 2022):
    ``[p(x)]_y * KL(p(x) || p(x + delta))``, nothing detached (Algorithm 1 differentiates the whole
    expression, the weight ``[p(x)]_y`` included)."""
    log_p, log_q = F.log_softmax(clean_logits, dim=1), F.log_softmax(noisy_logits, dim=1)
    true_class_probability = log_p.gather(1, labels.view(-1, 1)).squeeze(1).exp()
    return true_class_probability * kl_divergence(log_p, log_q)


def jensen_shannon(log_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-example generalized Jensen-Shannon divergence of k distributions given as
    log-probabilities (each (B, classes)): ``(1/k) sum_i KL(p_i || M)``, ``M = (1/k) sum_i p_i``
    (AugMix, Hendrycks et al. 2020, Sec. 3: ``JS(p; q; z) = (KL(p || M) + KL(q || M) + KL(z || M)) / 3``;
    MAGN paper eq. 5 with k = 3), in nats. ``log M`` is computed with logsumexp, exactly."""
    stacked = torch.stack(list(log_probs))                                  # (k, B, classes)
    log_mixture = torch.logsumexp(stacked, dim=0) - math.log(len(stacked))
    kl = (stacked.exp() * (stacked - log_mixture)).sum(dim=-1)               # (k, B)
    return kl.mean(dim=0)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy ``H(y_hat) = -sum_c p_c log p_c`` of the softmax of each row of (N, C) logits, in
    nats (Tent, Wang et al. 2021, eq. 1), computed in float32 at least."""
    logits = logits.float()
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
