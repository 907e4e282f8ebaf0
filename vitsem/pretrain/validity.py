"""Is a pre-training benchmark valid by its own curves? (issue 13)

A speed-up "to reach the baseline's accuracy" means something only when the baseline
(random-mask MAE) learns within the budget: otherwise the target is noise around the
untrained encoder's accuracy. The rule, on the baseline's curve ``[a_0, a_1, ..., a_E]``
(accuracy after each epoch, ``a_0`` the untrained encoder):

- **gain**: ``max(a_1..a_E) - a_0 >= min_gain`` (default 0.10, ten points);
- **no late fall**: the final accuracy is within ``tolerance`` (default 0.02) of the best,
  ``a_E >= max(a_1..a_E) - tolerance``: a curve that peaks early and falls back is not
  learning, and a target of "the final accuracy" would sit below its own peak.

Both must hold; the reason names the first that fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vitsem.errors import ConfigError

INVALID_MESSAGE = "invalid: baseline did not learn"
"""What the benchmark prints, exactly, when the rule fails."""


@dataclass(frozen=True)
class Validity:
    valid: bool
    reason: str
    untrained: float
    best: float
    final: float

    @property
    def gain(self) -> float:
        """Best accuracy over the untrained encoder's."""
        return self.best - self.untrained


def baseline_validity(curve: Sequence[float], *, min_gain: float = 0.10,
                      tolerance: float = 0.02) -> Validity:
    """Judge the baseline's ``curve`` (epoch 0 = untrained first, then one value per
    epoch) by the rule of this module."""
    if len(curve) < 2:
        raise ConfigError(f"the baseline's curve needs the untrained accuracy and at least "
                          f"one epoch, got {len(curve)} values")
    untrained, trained = float(curve[0]), [float(a) for a in curve[1:]]
    best, final = max(trained), trained[-1]
    slack = 1e-9  # the thresholds themselves pass despite floating-point rounding
    if best - untrained < min_gain - slack:
        return Validity(False, f"best {best:.3f} is {best - untrained:+.3f} over the untrained "
                        f"encoder's {untrained:.3f}; at least {min_gain:+.3f} is required",
                        untrained, best, final)
    if final < best - tolerance - slack:
        return Validity(False, f"final {final:.3f} fell {best - final:.3f} below the best "
                        f"{best:.3f} (tolerance {tolerance:.3f})", untrained, best, final)
    return Validity(True, f"gain {best - untrained:+.3f} (untrained {untrained:.3f}, best "
                    f"{best:.3f}, final {final:.3f})", untrained, best, final)
