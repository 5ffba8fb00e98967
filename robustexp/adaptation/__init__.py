"""Test-time adaptation; ``conf/adaptation/<name>.yaml`` selects variants with ``+adaptation=<name>``.

The interface every adaptation implements and the evaluators use: :mod:`robustexp.adaptation.base`;
the adapt-then-freeze protocol of certification and attacks: :mod:`robustexp.adaptation.freeze`.

Reports over a run's grid of variants: :mod:`robustexp.adaptation.sweep` (curves, Schneider et al.
Fig. 1, Nandy et al. Tables 4-5) and :mod:`robustexp.adaptation.prior_selection` (partial
adaptation's prior strength N chosen on the hold-out corruptions or by Proposition 1, Schneider et
al. Sec. 4 and 6; imported by its full path, as it builds on the evaluators)."""

from robustexp.adaptation.base import NoAdaptation, TestTimeAdaptation
from robustexp.adaptation.bn import BatchNormAdaptation
from robustexp.adaptation.tent import TentAdaptation

__all__ = ["BatchNormAdaptation", "NoAdaptation", "TentAdaptation", "TestTimeAdaptation"]
