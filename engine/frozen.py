"""A frozen phase: after `challenge freeze` (engine/freeze.py) its results never change.

The guard every path that would change a phase's results calls first: submit, re-run,
rescore, cancel. Its own module: those paths are imported by the freeze itself.
"""

from __future__ import annotations

from engine.errors import Conflict


class PhaseFrozen(Conflict):
    """The phase's results were frozen by `challenge freeze`: they never change again."""


def refuse_if_frozen(phase_row, what: str) -> None:
    """Refuse `what` (a verb phrase) on a frozen phase."""
    if phase_row is not None and phase_row.frozen_at is not None:
        raise PhaseFrozen(
            f"cannot {what}: phase {phase_row.slug} of {phase_row.challenge_id} was frozen "
            f"on {phase_row.frozen_at:%Y-%m-%d %H:%M} UTC (epreuve challenge freeze) and its "
            "results never change. Reproducing a submission is still possible")
