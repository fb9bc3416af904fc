"""The toy world's look: shapes, patterns and tints, rendered with numpy (data.ToyDataset turns them into datasets).

A toy image is a look -- a shape (8 families, each with its own hue), a pattern (6) and a tint (pale or deep) -- drawn
upright with a small random offset and size, a random background and noise, anti-aliased by supersampling.
`toy_looks` says which looks each of the two sets holds: toy-base every shape in 4 of its 6 patterns, in both tints
(ImageNet's role), toy the 16 shape-pattern combinations the base never shows, in both tints (iNat21-mini's role).
The pose varies little on purpose: a DiT small enough to train on 2 CPU cores in under an hour draws upright shapes
recognisably, but not shapes turned and shifted at random (tried: blobs after 6,000 steps).
"""
import numpy as np

TOY_SHAPES = ["disc", "square", "triangle", "cross", "diamond", "hexagon", "ellipse", "star"]
TOY_PATTERNS = ["plain", "striped", "spotted", "eyed", "checkered", "ringed"]
TOY_TINTS = ["pale", "deep"]


def toy_unseen_patterns(shape):
    """The two patterns shape `shape` never wears in the base set (every pattern is worn by 5 or 6 other shapes)."""
    return shape % 6, (shape + 3) % 6


def toy_looks(name):
    """[(shape, pattern, tint)] of a toy set's classes in class-id order. Both sets name the tint in the label, as
    ImageNet's classes come with their colours (tried: a base whose tints were blended at random, unlabelled, drew a
    third of the deep species pale after FineDiffusion's tuning: its 1% of the weights could not learn tint)."""
    families = range(len(TOY_SHAPES))
    if name == "toy-base":
        shape_patterns = [(f, p) for f in families for p in range(len(TOY_PATTERNS)) if p not in toy_unseen_patterns(f)]
    else:
        shape_patterns = [(f, p) for f in families for p in toy_unseen_patterns(f)]
    return [(f, p, t) for f, p in shape_patterns for t in range(len(TOY_TINTS))]


def _shape_mask(shape, x, y):
    """Inside-test of a unit-sized shape in its own frame; x, y: arrays of object-frame coordinates."""
    ax, ay = np.abs(x), np.abs(y)
    if shape == "disc":
        return x * x + y * y <= 1.0
    if shape == "square":
        return np.maximum(ax, ay) <= 0.85
    if shape == "triangle":  # apex up (image y grows downwards)
        return (y <= 0.65) & (y >= -1.0 + 1.65 / 0.95 * ax)
    if shape == "cross":
        return ((ax <= 0.34) & (ay <= 0.95)) | ((ay <= 0.34) & (ax <= 0.95))
    if shape == "diamond":  # an elongated rhombus, so it is not just a rotated square
        return ax / 0.75 + ay / 1.05 <= 1.0
    if shape == "hexagon":
        return (ay <= 0.866) & (1.732 * ax + ay <= 1.732)
    if shape == "ellipse":
        return (x / 1.0) ** 2 + (y / 0.6) ** 2 <= 1.0
    if shape == "star":
        return np.hypot(x, y) <= 0.62 + 0.38 * np.cos(5 * np.arctan2(x, -y))
    raise ValueError(shape)


def _pattern_mask(pattern, x, y):
    """Where a pattern marks the body, in the object frame (so it turns with the shape); sizes suit 32 px."""
    if pattern == "plain":
        return np.zeros(x.shape, dtype=bool)
    if pattern == "striped":  # dark bands, period 0.7 radii
        return ((y * 1.43) % 1.0) < 0.5
    if pattern == "spotted":  # light dots on a 0.8-radius grid
        return ((x * 1.25) % 1.0 - 0.5) ** 2 + ((y * 1.25) % 1.0 - 0.5) ** 2 < 0.08
    if pattern == "eyed":  # one dark central eye
        return x * x + y * y < 0.17
    if pattern == "checkered":  # dark squares of 0.6 radii
        return (np.floor(x * 1.67) + np.floor(y * 1.67)) % 2 == 0
    if pattern == "ringed":  # one dark ring around the centre
        return np.abs(np.hypot(x, y) - 0.55) < 0.15
    raise ValueError(pattern)


def _hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB; h, s, v: arrays of shape (B,) in [0, 1] -> (B, 3)."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    return np.stack([np.choose(i, [c[channel] for c in choices]) for channel in range(3)], axis=-1)


def _coverage(mask, supersample):
    """(B, n, n) bool mask -> (B, n/s, n/s, 1): the fraction of each output pixel's s x s subpixels inside."""
    B, n, _ = mask.shape
    m = n // supersample
    return mask.reshape(B, m, supersample, m, supersample).mean(axis=(2, 4), dtype=np.float32)[..., None]


def render_toy(looks, rngs, image_size, supersample=2):
    """One uint8 image (H, W, 3) per (look, rng), stacked (B, H, W, 3); each image depends on its own rng only.
    look: (shape, pattern, tint), tint 0 pale, 1 deep."""
    B = len(looks)
    shape, pattern = (np.array([look[k] for look in looks]) for k in (0, 1))  # (B,), (B,)
    u = np.stack([rng.random(10) for rng in rngs]).astype(np.float32)  # (B, 10): the image's random look
    noise = np.stack([rng.standard_normal((image_size, image_size, 3), dtype=np.float32) for rng in rngs])
    tint = np.array([look[2] for look in looks], np.float32)  # (B,)

    # pose: upright, centre within +-0.04 of the middle, radius 0.60-0.66 of the half-width
    cx, cy = (u[:, 0] - 0.5) * 0.08, (u[:, 1] - 0.5) * 0.08
    radius = 0.60 + 0.06 * u[:, 2]
    # colour: the family's hue; pale (light, washed out) or deep (dark, saturated), a little jitter on each
    hue = shape / len(TOY_SHAPES) + 0.02 * (u[:, 3] - 0.5)
    sat = 0.35 + 0.6 * tint + 0.08 * (u[:, 4] - 0.5)
    val = 1.0 - 0.4 * tint + 0.08 * (u[:, 5] - 0.5)
    fg = _hsv_to_rgb((hue % 1.0).astype(np.float32), sat, np.clip(val, 0, 1))  # (B, 3)
    bg = _hsv_to_rgb(u[:, 6], 0.15 * u[:, 7], 0.1 + 0.25 * u[:, 8])  # (B, 3): dark, nearly grey
    dark, light = 0.3 * fg, 0.35 * fg + 0.65  # (B, 3): colours of the pattern marks
    mark_rgb = np.where((pattern == TOY_PATTERNS.index("spotted"))[:, None], light, dark)

    # supersampled pixel-centre grid in [-1, 1], then each image's object frame (unit = shape radius)
    n = image_size * supersample
    t = ((np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1)
    gy, gx = t[None, :, None], t[None, None, :]  # (1, n, 1), (1, 1, n)
    dx, dy = gx - cx[:, None, None], gy - cy[:, None, None]  # (B, n, n)
    x, y = dx / radius[:, None, None], dy / radius[:, None, None]  # (B, n, n)

    inside = np.zeros((B, n, n), dtype=bool)  # the shape
    mark = np.zeros((B, n, n), dtype=bool)  # its pattern, where it differs from the body
    for f in np.unique(shape):
        inside[shape == f] = _shape_mask(TOY_SHAPES[f], x[shape == f], y[shape == f])
    for k in np.unique(pattern):
        sel = pattern == k
        mark[sel] = _pattern_mask(TOY_PATTERNS[k], x[sel], y[sel])

    # anti-aliasing: average the supersampled masks into per-pixel coverage, then composite the flat colours
    shape_cover = _coverage(inside, supersample)  # (B, H, W, 1)
    mark_cover = _coverage(inside & mark, supersample)  # (B, H, W, 1)
    t = t.reshape(image_size, supersample).mean(axis=1)  # pixel centres at the output resolution
    direction = 2 * np.pi * u[:, 9, None, None]
    gradient = 1.0 + 0.2 * (np.cos(direction) * t[None, None, :] + np.sin(direction) * t[None, :, None])  # (B, H, W)
    img = bg[:, None, None, :] * gradient[..., None] * (1.0 - shape_cover)  # (B, H, W, 3)
    img += fg[:, None, None, :] * (shape_cover - mark_cover) + mark_rgb[:, None, None, :] * mark_cover
    img += 0.015 * noise
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)  # (B, H, W, 3)
