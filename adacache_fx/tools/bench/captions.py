"""The bench's captions: a balanced evaluation set, held-out calibration captions, the quick subset."""

from __future__ import annotations

import numpy as np


def eval_captions(n: int = 24) -> tuple[str, ...]:
    """``n`` captions (n a multiple of 24 keeps every marginal exact): speeds cycle still/slow/fast, each
    direction gets as many slow as fast captions, shapes cycle, colours and sizes are a fixed shuffle."""
    from ..reference.data import COLOURS, DIRECTIONS, SHAPES, SIZES, SPEEDS, Caption

    rng = np.random.default_rng(0)
    colours = rng.permutation(np.repeat(list(COLOURS), -(-n // len(COLOURS))))[:n]
    sizes = rng.permutation(np.repeat(list(SIZES), -(-n // len(SIZES))))[:n]
    captions, moving = [], 0
    for i in range(n):
        speed = SPEEDS[i % 3]
        direction = None
        if speed != "still":
            direction, moving = DIRECTIONS[(moving // 2) % len(DIRECTIONS)], moving + 1
        shape = SHAPES[(i + i // 3) % len(SHAPES)]
        captions.append(Caption(shape, str(colours[i]), str(sizes[i]), direction, speed).text)
    return tuple(captions)


#: Evaluation captions: 8 still, 8 slow, 8 fast; 4 per direction; 8 per shape; 4 per colour; 12 per size.
EVAL_CAPTIONS = eval_captions()
#: Held-out captions for the calibrations (adacache-fx codebooks, MagCache ratios): none is evaluated.
CALIBRATION_CAPTIONS = (
    "a large yellow circle staying still",
    "a small green triangle staying still",
    "a small yellow square moving up slow",
    "a large white triangle moving down slow",
    "a large red square moving left fast",
    "a small blue circle moving up fast",
)
#: ``--quick``: one still and one fast caption, 10 steps, one seed, one setting per method.
QUICK_CAPTIONS = (EVAL_CAPTIONS[0], EVAL_CAPTIONS[2])
QUICK_STEPS = 10
