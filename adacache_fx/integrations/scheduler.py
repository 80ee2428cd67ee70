"""A scheduler method wrapped on the instance, for the diffusers integration's generation follower.

``SchedulerHook`` runs the method of the scheduler it is found on, then tells the follower. A deepcopy of the
scheduler (SkyReels-V2's diffusion forcing keeps one per latent frame) gets a hook of its own that runs the
copy's method: a plain closure would be shared by the copy and step or reset the original scheduler.
"""

from __future__ import annotations

import functools
from collections.abc import Callable


class SchedulerHook:
    """``scheduler.<name>`` that calls ``after()`` once the scheduler's own method returned."""

    def __init__(self, scheduler, name: str, after: Callable[[], None], follower):
        original = getattr(scheduler, name)
        functools.update_wrapper(self, original)  # keeps the signature diffusers inspects (timesteps=)
        self.original, self.scheduler, self.name, self.after = original, scheduler, name, after
        self.adacache_follower = follower

    def __call__(self, *args, **kwargs):
        result = self.original(*args, **kwargs)
        self.after()
        return result

    def __deepcopy__(self, memo):
        copy = memo.get(id(self.scheduler))
        if copy is None:  # the hook copied on its own: it stays the original scheduler's
            return self
        return SchedulerHook(copy, self.name, self.after, self.adacache_follower)


def hook(scheduler, name: str, after: Callable[[], None], follower) -> bool:
    """Wrap ``scheduler.<name>`` on the instance (False when it has no such method)."""
    if getattr(scheduler, name, None) is None:
        return False
    setattr(scheduler, name, SchedulerHook(scheduler, name, after, follower))
    return True


def hooked(scheduler, name: str, follower) -> bool:
    """Whether ``scheduler.<name>`` is ``follower``'s hook."""
    return getattr(vars(scheduler).get(name), "adacache_follower", None) is follower


def unhook(scheduler, name: str, follower) -> None:
    if hooked(scheduler, name, follower):
        del vars(scheduler)[name]
