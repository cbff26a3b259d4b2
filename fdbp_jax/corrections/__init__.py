"""Staleness corrections of FDBP: what a stage does about its gradient arriving stage_delay(k, K) ticks
after the forward it belongs to. A correction has two hooks, both per stage and given its delay:
`optimizer` wraps the stage's optax optimizer (state a correction needs, or a different update), and
`forward_params` gives the weights the stage's forwards run with (and that are stashed with them, so
the delayed gradient stays the exact gradient of the forward that ran). A new correction is one file
and one entry in `CORRECTIONS`."""

from __future__ import annotations

import dataclasses
from typing import Any

import optax

from fdbp_jax.corrections.lookahead import Lookahead, delay_nesterov
from fdbp_jax.corrections.predict import WeightPrediction, remember_update


@dataclasses.dataclass(frozen=True)
class NoCorrection:
    """Plain FDBP: the stage's optimizer as given, forwards on the current weights."""

    name: str = "none"
    moves_forward_weights: bool = False

    def optimizer(self, optimizer: optax.GradientTransformation, delay: int) -> optax.GradientTransformation:
        return optimizer

    def forward_params(self, params: Any, opt_state: Any, delay: int) -> Any:
        return params


Correction = NoCorrection | WeightPrediction | Lookahead
CORRECTIONS: dict[str, type] = {"none": NoCorrection, "predict": WeightPrediction, "lookahead": Lookahead}


def as_correction(correction: str | Correction) -> Correction:
    """The correction of a name in `CORRECTIONS` (with its defaults), or a correction as given; a
    ValueError naming the valid ones otherwise."""
    if isinstance(correction, str) and correction in CORRECTIONS:
        return CORRECTIONS[correction]()
    if isinstance(correction, tuple(CORRECTIONS.values())):
        return correction
    raise ValueError(f"correction={correction!r} is not known: use one of {tuple(CORRECTIONS)} "
                     f"(or an instance of {', '.join(c.__name__ for c in CORRECTIONS.values())})")


__all__ = ["CORRECTIONS", "Correction", "Lookahead", "NoCorrection", "WeightPrediction", "as_correction",
           "delay_nesterov", "remember_update"]
