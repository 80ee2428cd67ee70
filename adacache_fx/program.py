"""Program: one captured and rewritten call signature of a :class:`~adacache_fx.CachedModel`, and the key
it is stored under."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.fx as fx

from .capture import CapturedGraph
from .eager import eager_module
from .passes import RewriteResult
from .state import StateLayout


@dataclass
class Program:
    """A captured and rewritten call signature: the graph module and its state layout.

    ``graph_module`` is what ``torch.compile`` and export trace; eager calls run :attr:`eager`, its
    twin with fewer Python layers (:mod:`adacache_fx.eager`), rebuilt after a program hook runs.
    """

    captured: CapturedGraph
    rewrite: RewriteResult
    _eager: fx.GraphModule | None = field(default=None, repr=False, compare=False)

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.rewrite.graph_module

    @property
    def eager(self) -> fx.GraphModule:
        """The module eager calls run: :func:`~adacache_fx.eager.eager_module` of ``graph_module``."""
        if self._eager is None:
            self._eager = eager_module(self.graph_module)
        return self._eager

    def changed(self) -> None:
        """Say that ``graph_module`` (or a branch of it) was changed: the eager twin is rebuilt."""
        self._eager = None

    def __getstate__(self):  # copies and pickles rebuild the twin (its code binds C++ callables)
        return {**self.__dict__, "_eager": None}

    @property
    def layout(self) -> StateLayout:
        return self.rewrite.layout


class SignatureKey(NamedTuple):
    """What a captured program is specialized to: the call's structure, shapes, dtypes, constants and
    static inputs' values (:func:`~adacache_fx.capture.signature`), and the weights' dtype and device."""

    call: tuple
    dtype: torch.dtype | None
    device: str
