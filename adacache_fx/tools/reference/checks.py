"""Caption-faithfulness check for clips of the synthetic reference data.

Because every reference clip holds a single bright object on a dark background, a generated clip can be
scored against its caption without any learned metric: find the object in every frame (pixels clearly
brighter than the background), fit a constant velocity to the per-frame centroids, and read off motion
direction, speed, colour, size and shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import COLOURS, NUM_FRAMES, SHAPES, Caption, _coverage

#: A pixel belongs to the object when its brightest channel exceeds the frame's median by this much.
CONTRAST_THRESHOLD = 0.5
#: Minimum object pixels for a frame to count as showing the object.
MIN_PIXELS = 4
#: Speed classes (pixels per frame): below STILL_MAX is "still", below SLOW_MAX "slow", else "fast".
STILL_MAX = 0.4
SLOW_MAX = 2.0
#: Object area (pixels) separating "small" from "large".
SIZE_AREA_SPLIT = 60.0
#: Radii (pixels, as used by ``data._coverage``) tried when fitting a shape template.
_TEMPLATE_RADII = np.arange(2.0, 9.01, 0.25)

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = torch.tensor([COLOURS[n] for n in _PALETTE_NAMES])


@dataclass
class ClipCheck:
    """Measured properties of a clip and whether they match the caption.

    ``ok`` combines direction, speed and colour (the attributes the check measures most reliably);
    ``size_ok`` and ``shape_ok`` are reported separately.
    """

    caption: Caption
    visible_frames: int
    centroids: list[tuple[float, float] | None]  # per frame (x, y) in pixels, y downwards
    velocity: tuple[float, float]  # fitted (dx, dy) in pixels per frame
    speed_px: float  # |velocity|
    jitter_px: float  # RMS residual of the constant-velocity fit
    direction: str | None  # None when the object is (measured as) still or missing
    speed: str | None
    colour: str | None
    mean_rgb: tuple[float, float, float] | None
    area: float
    size: str | None
    shape_error: float  # template mismatch of the best shape (0 = perfect), NaN if not measured
    shape: str | None
    direction_ok: bool
    speed_ok: bool
    colour_ok: bool
    size_ok: bool
    shape_ok: bool
    ok: bool


def _speed_class(speed: float) -> str:
    if speed < STILL_MAX:
        return "still"
    return "slow" if speed < SLOW_MAX else "fast"


def _direction(vx: float, vy: float) -> str:
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def _shape_errors(cover: torch.Tensor, centre: tuple[float, float], area: float) -> np.ndarray:
    """Mismatch (L1 / area) between ``cover`` ``[H, W]`` and each shape's best-fitting template.

    Templates share the object's centroid (all shapes are rendered centred on their centroid); the size is
    searched rather than derived from the area so that objects cut by the frame border still match.
    """
    radii = _TEMPLATE_RADII[:, None, None]  # broadcasts against the [1, H, W] offsets in _coverage
    target = cover.numpy()[None]
    errors = [
        np.abs(_coverage(s, radii, np.asarray([centre])) - target).sum(axis=(1, 2)).min() for s in SHAPES
    ]
    return np.asarray(errors) / area


def check_clip(clip: torch.Tensor, caption: Caption) -> ClipCheck:
    """Measure ``clip`` (``[3, T, H, W]`` in [-1, 1]) and compare it with ``caption``."""
    clip = clip.detach().float().cpu()
    if clip.ndim != 4 or clip.shape[0] != 3:
        raise ValueError(f"expected a clip [3, T, H, W], got {tuple(clip.shape)}")
    _, t_len, height, width = clip.shape
    bright = clip.amax(dim=0)  # [T, H, W]
    background = bright.flatten(1).median(dim=1).values  # [T]; the object covers well under half
    contrast = bright - background[:, None, None]
    mask = contrast > CONTRAST_THRESHOLD
    # Anti-aliased edges fall below the threshold: include a one-pixel ring around the mask.
    near = F.max_pool2d(mask[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")

    centroids: list[tuple[float, float] | None] = []
    areas, shape_err, core_rgb = [], [], []
    for f in range(t_len):
        if int(mask[f].sum()) < MIN_PIXELS:
            centroids.append(None)
            continue
        level = contrast[f][mask[f]].quantile(0.9).clamp_min(1e-3)
        cover = torch.where(near[f], (contrast[f] / level).clamp(0.0, 1.0), torch.zeros(()))
        total = float(cover.sum())
        centroids.append((float((cover * xs).sum()) / total, float((cover * ys).sum()) / total))
        areas.append(total)
        core_rgb.append(clip[:, f][:, cover > 0.7].T)
        shape_err.append(_shape_errors(cover, centroids[-1], total))

    frames = [i for i, c in enumerate(centroids) if c is not None]
    visible = len(frames)
    vx = vy = speed_px = jitter = 0.0
    direction = speed = colour = size = shape = None
    mean_rgb = None
    area = float(np.median(areas)) if areas else 0.0
    shape_error = float("nan")
    if visible >= 2:
        t = np.asarray(frames, dtype=np.float64)
        pos = np.asarray([centroids[i] for i in frames], dtype=np.float64)  # [n, 2]
        tc = t - t.mean()
        vel = (tc[:, None] * (pos - pos.mean(axis=0))).sum(axis=0) / (tc**2).sum()
        vx, vy = float(vel[0]), float(vel[1])
        resid = pos - pos.mean(axis=0) - tc[:, None] * vel[None, :]
        jitter = float(np.sqrt((resid**2).sum(axis=1).mean()))
        speed_px = float(np.hypot(vx, vy))
        speed = _speed_class(speed_px)
        direction = None if speed == "still" else _direction(vx, vy)
        size = "small" if area < SIZE_AREA_SPLIT else "large"
        if shape_err:
            errors = np.mean(shape_err, axis=0)
            shape, shape_error = SHAPES[int(errors.argmin())], float(errors.min())
        rgb = torch.cat(core_rgb)
        if len(rgb):
            mean = rgb.mean(dim=0)
            mean_rgb = tuple(float(v) for v in mean)
            colour = _PALETTE_NAMES[int(((_PALETTE - mean) ** 2).sum(dim=1).argmin())]

    direction_ok = speed is not None and direction == caption.direction
    speed_ok = speed == caption.speed
    colour_ok = colour == caption.colour
    return ClipCheck(
        caption=caption,
        visible_frames=visible,
        centroids=centroids,
        velocity=(vx, vy),
        speed_px=speed_px,
        jitter_px=jitter,
        direction=direction,
        speed=speed,
        colour=colour,
        mean_rgb=mean_rgb,
        area=area,
        size=size,
        shape_error=shape_error,
        shape=shape,
        direction_ok=direction_ok,
        speed_ok=speed_ok,
        colour_ok=colour_ok,
        size_ok=size == caption.size,
        shape_ok=shape == caption.shape,
        ok=direction_ok and speed_ok and colour_ok,
    )


def check_clips(clips: torch.Tensor, captions: list[Caption]) -> dict[str, float]:
    """Fraction of ``clips`` ``[B, 3, T, H, W]`` passing each check (keys ``ok``, ``direction_ok``, ...)."""
    return check_rates([check_clip(c, cap) for c, cap in zip(clips, captions, strict=True)])


def check_rates(results: list[ClipCheck]) -> dict[str, float]:
    """The pass rates of :func:`check_clips` from clips already checked."""
    keys = ("ok", "direction_ok", "speed_ok", "colour_ok", "size_ok", "shape_ok")
    rates = {k: float(np.mean([getattr(r, k) for r in results])) for k in keys}
    rates["visible"] = float(np.mean([r.visible_frames == NUM_FRAMES for r in results]))
    return rates
