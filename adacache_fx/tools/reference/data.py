"""Synthetic captioned video clips for the reference model (no downloads).

Each clip shows one anti-aliased object (circle, square or triangle) on a dark background, either static
or moving in one of four directions at a constant speed. Clips are float32 tensors laid out as
``[C, T, H, W] = [3, 8, 32, 32]`` with values in ``[-1, 1]``.

Captions follow a tiny grammar::

    a {size} {colour} {shape} moving {direction} {speed}     # speed in {slow, fast}
    a {size} {colour} {shape} staying still

Everything is deterministic given an explicit :class:`numpy.random.Generator`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

NUM_FRAMES = 8
HEIGHT = 32
WIDTH = 32
CHANNELS = 3
MAX_CAPTION_LEN = 8

SHAPES = ("circle", "square", "triangle")
#: RGB in [-1, 1]; the brightest channel is 1.0 for every colour.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -0.8, -0.8),
    "green": (-0.8, 1.0, -0.8),
    "blue": (-0.8, -0.8, 1.0),
    "yellow": (1.0, 1.0, -0.8),
    "white": (1.0, 1.0, 1.0),
    "magenta": (1.0, -0.8, 1.0),
}
SIZES = ("small", "large")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("still", "slow", "fast")

BACKGROUND = -0.9
#: Circle radius in pixels; squares and triangles are scaled to a similar area.
SIZE_RADIUS = {"small": 3.5, "large": 6.0}
#: Pixels per frame.
SPEED_PX = {"still": 0.0, "slow": 1.0, "fast": 3.0}
#: Unit displacement per direction as (dx, dy); y grows downwards (image rows).
DIRECTION_VEC = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SQUARE_HALF_SIDE = 0.85  # times the radius
TRIANGLE_CIRCUMRADIUS = 1.4  # times the radius
#: How far (in pixels) the object's centre may get closer to the border than its radius.
EDGE_MARGIN = 1.5

PAD_TOKEN = "<pad>"
#: Fixed word-level vocabulary; index 0 is padding.
VOCAB: tuple[str, ...] = (
    PAD_TOKEN,
    "a",
    *SIZES,
    *COLOURS,
    *SHAPES,
    "moving",
    "staying",
    *DIRECTIONS,
    *SPEEDS,
)
WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}


@dataclass(frozen=True)
class Caption:
    """Structured caption. ``direction`` is ``None`` exactly when ``speed == "still"``."""

    shape: str
    colour: str
    size: str
    direction: str | None
    speed: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")
        if self.speed not in SPEEDS:
            raise ValueError(f"unknown speed {self.speed!r}")
        if self.speed == "still":
            if self.direction is not None:
                raise ValueError("a still caption has no direction")
        elif self.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r}")

    @property
    def text(self) -> str:
        head = f"a {self.size} {self.colour} {self.shape}"
        if self.speed == "still":
            return f"{head} staying still"
        return f"{head} moving {self.direction} {self.speed}"


def parse_caption(text: str) -> Caption:
    """Inverse of :attr:`Caption.text`; raises ``ValueError`` on text outside the grammar."""
    words = text.split()
    if len(words) == 6 and words[0] == "a" and words[4:] == ["staying", "still"]:
        return Caption(shape=words[3], colour=words[2], size=words[1], direction=None, speed="still")
    if len(words) == 7 and words[0] == "a" and words[4] == "moving" and words[6] != "still":
        return Caption(shape=words[3], colour=words[2], size=words[1], direction=words[5], speed=words[6])
    raise ValueError(f"caption outside the grammar: {text!r}")


def sample_caption(rng: np.random.Generator, shape_mix: Sequence[float] | None = None) -> Caption:
    """Uniformly random caption (speed uniform over still/slow/fast); ``shape_mix``: relative frequencies of
    :data:`SHAPES` instead of uniform shapes (the uniform draw, and its random stream, without it)."""
    speed = SPEEDS[rng.integers(len(SPEEDS))]
    direction = None if speed == "still" else DIRECTIONS[rng.integers(len(DIRECTIONS))]
    if shape_mix is None:
        shape = SHAPES[rng.integers(len(SHAPES))]
    else:
        shape = SHAPES[rng.choice(len(SHAPES), p=shape_probabilities(shape_mix))]
    return Caption(
        shape=shape,
        colour=tuple(COLOURS)[rng.integers(len(COLOURS))],
        size=SIZES[rng.integers(len(SIZES))],
        direction=direction,
        speed=speed,
    )


def evaluation_captions(repeats: int = 4, seed: int = 2024) -> list[Caption]:
    """The fixed evaluation set: ``12 * repeats`` captions (48 by default), balanced over motion.

    Each repeat holds every (direction, speed) pair once plus 4 still captions, so a third is still and every
    direction/speed pair appears ``repeats`` times; shapes, colours and sizes are dealt evenly and shuffled
    with ``seed``.
    """
    motions = [(d, s) for d in DIRECTIONS for s in SPEEDS[1:]] + [(None, "still")] * 4
    n = len(motions) * repeats
    rng = np.random.default_rng(seed)

    def dealt(values) -> list:
        return list(rng.permutation(np.resize(np.asarray(values), n)))

    shapes, colours, sizes = dealt(SHAPES), dealt(tuple(COLOURS)), dealt(SIZES)
    return [Caption(str(shapes[i]), str(colours[i]), str(sizes[i]), d, s) for i, (d, s) in enumerate(motions * repeats)]


def _trajectory(caption: Caption, rng: np.random.Generator) -> np.ndarray:
    """Object centres ``[T, 2]`` as (x, y), keeping the object (nearly) inside the frame."""
    r = SIZE_RADIUS[caption.size]
    travel = SPEED_PX[caption.speed] * (NUM_FRAMES - 1)
    dx, dy = DIRECTION_VEC[caption.direction] if caption.direction else (0.0, 0.0)
    margin = EDGE_MARGIN if travel > 0 else 0.0
    lo, hi = r - margin, WIDTH - r + margin  # square frames: same bounds for x and y
    along = rng.uniform(lo, hi - travel)  # start position along the motion axis
    across = rng.uniform(r, WIDTH - r)  # the other axis keeps the whole object visible
    if dx < 0 or dy < 0:
        along = along + travel
    start = np.array([along, across]) if dy == 0 else np.array([across, along])
    steps = np.arange(NUM_FRAMES, dtype=np.float64)[:, None] * SPEED_PX[caption.speed]
    return start[None, :] + steps * np.array([dx, dy])[None, :]


def _coverage(shape: str, radius: float, centres: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage ``[T, H, W]`` in [0, 1] from a signed distance (positive inside)."""
    ys, xs = np.meshgrid(np.arange(HEIGHT) + 0.5, np.arange(WIDTH) + 0.5, indexing="ij")
    px = xs[None] - centres[:, 0, None, None]
    py = ys[None] - centres[:, 1, None, None]
    if shape == "circle":
        sd = radius - np.hypot(px, py)
    elif shape == "square":
        sd = SQUARE_HALF_SIDE * radius - np.maximum(np.abs(px), np.abs(py))
    else:  # upward equilateral triangle centred on its centroid; outward edge normals below
        big_r = TRIANGLE_CIRCUMRADIUS * radius
        c = math.sqrt(3.0) / 2.0
        proj = np.maximum(np.maximum(py, -c * px - 0.5 * py), c * px - 0.5 * py)
        sd = 0.5 * big_r - proj
    return np.clip(sd + 0.5, 0.0, 1.0)


def render_clip(caption: Caption, rng: np.random.Generator) -> torch.Tensor:
    """Render one clip ``[3, 8, 32, 32]`` (float32, values in [-1, 1]) for ``caption``."""
    centres = _trajectory(caption, rng)
    alpha = _coverage(caption.shape, SIZE_RADIUS[caption.size], centres)  # [T, H, W]
    colour = np.asarray(COLOURS[caption.colour])[:, None, None, None]
    clip = BACKGROUND + alpha[None] * (colour - BACKGROUND)
    return torch.from_numpy(clip.astype(np.float32))


def shape_probabilities(shape_mix: Sequence[float]) -> np.ndarray:
    """``shape_mix`` (one non-negative weight per shape of :data:`SHAPES`, not all zero) as probabilities."""
    mix = np.asarray(shape_mix, dtype=np.float64)
    if mix.shape != (len(SHAPES),) or not np.isfinite(mix).all() or (mix < 0).any() or mix.sum() <= 0:
        raise ValueError(f"shape mix {tuple(shape_mix)}: one non-negative weight per shape {SHAPES}, not all zero")
    return mix / mix.sum()


def sample_batch(
    rng: np.random.Generator, batch_size: int, shape_mix: Sequence[float] | None = None
) -> tuple[torch.Tensor, list[Caption]]:
    """Random captions (:func:`sample_caption`) and their clips: ``([B, 3, 8, 32, 32], captions)``."""
    captions = [sample_caption(rng, shape_mix) for _ in range(batch_size)]
    clips = torch.stack([render_clip(c, rng) for c in captions])
    return clips, captions


def encode_captions(texts: list[str], max_len: int = MAX_CAPTION_LEN) -> torch.Tensor:
    """Word-level token ids ``LongTensor[B, max_len]``, right-padded with 0. ``""`` is all padding."""
    ids = torch.zeros(len(texts), max_len, dtype=torch.long)
    for row, text in enumerate(texts):
        words = text.split()
        if len(words) > max_len:
            raise ValueError(f"caption longer than {max_len} words: {text!r}")
        for col, word in enumerate(words):
            if word not in WORD_TO_ID or word == PAD_TOKEN:
                raise ValueError(f"word {word!r} not in the vocabulary")
            ids[row, col] = WORD_TO_ID[word]
    return ids


def decode_tokens(ids: torch.Tensor) -> list[str]:
    """Inverse of :func:`encode_captions` (padding dropped)."""
    return [" ".join(VOCAB[i] for i in row.tolist() if i != 0) for row in ids]
