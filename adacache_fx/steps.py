"""What a step count N allows a policy, said on the host before any step runs.

:func:`always_computed` is the fewest steps the policy's rule computes at N (its forced first and last
steps, and what its caps force); :class:`StepCountCheck` warns once per N when those are all N steps, so
nothing can be cached. Both replay the rule on the host (:mod:`adacache_fx.policies.replay`); a rule that
cannot be replayed is not checked (logged at debug level). :func:`user_stacklevel` points a warning raised
inside the package at the user's line.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

logger = logging.getLogger("adacache_fx")


def user_stacklevel() -> int:
    """The ``stacklevel`` of a warning raised in adacache_fx that points at the first caller outside it."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def always_computed(config, num_steps: int) -> tuple[int, ...] | None:
    """The steps ``config``'s rule computes at ``num_steps`` whatever the video (None: not replayable)."""
    from .policies.replay import fewest_computed

    try:
        return tuple(fewest_computed(config, num_steps))
    except Exception:  # noqa: BLE001 - a rule that cannot be replayed (at this N, or on many runs)
        return None


class StepCountCheck:
    """Called with each N a model is given: warns once per N when the policy computes every step."""

    def __init__(self, config):
        self.config = config
        self._checked: set[int] = set()

    def __call__(self, num_steps: int | None) -> None:
        if num_steps is None or num_steps < 3 or num_steps in self._checked:
            return  # fewer than 3 steps: the caller warns (every step computes by design)
        self._checked.add(num_steps)
        from .policies.replay import nothing_to_skip

        try:
            forced = nothing_to_skip(self.config, num_steps)
        except Exception as error:  # noqa: BLE001 - a rule written for one run only cannot be replayed on many
            logger.debug("few-step check skipped: %s cannot be replayed (%s: %s)",
                         type(self.config).__name__, type(error).__name__, error)
            return
        if forced is not None:
            warnings.warn(
                f"adacache_fx: with {num_steps} steps, {type(self.config).__name__} computes every "
                f"step even when nothing changes (steps {forced}: the first and last steps its rule always "
                "computes), so nothing is cached; use more steps or a config that forces fewer",
                stacklevel=user_stacklevel(),
            )
