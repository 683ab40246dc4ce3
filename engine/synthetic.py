"""A synthetic world shaped like PACS: 4 styles (domains) x 7 object classes, rendered on the fly.

It exists so the product runs offline and still shows a real distribution shift. Every image is a
pure function of (domain, class, index, seed, size): nothing is stored, any split is reproducible.

The styles mimic PACS: ``photo`` (shaded, textured fill on a textured scene), ``cartoon`` (flat
colours, thick outlines), ``art_painting`` (brush strokes everywhere, ragged edges) and ``sketch``
(grey line drawing on paper, no colour). ``SHIFTED_DOMAIN`` is left out of the shipped CLIP's
pre-training, so zero-shot accuracy there is genuinely lower and adapters have something to fix.

``CROP_DOMAINS`` are a preprocessing shift rather than a style shift: the photo style framed tightly
(``photo_tight``: the object fills the frame and is cut at its edges, as a detector's tight crop) or
loosely (``photo_loose``: a small object in a large scene), and ``photo_mix90``, tight for 9 images in
10 and loose for the 10th (index % 10 == 9), a validation set 90% like one site and 10% like the other.
They are opt-in: a preset names them in ``data.domains``; ``DOMAINS``, the default world, keeps its four
styles and their pictures unchanged.

``STYLE_DOMAINS`` are opt-in styles made to have headroom for adapters on the shipped CLIP (measured with
``benchmarks/probe.py``; docs/offline-world.md): ``pixel_art`` is the cartoon style reduced to 16 x 16
flat cells, so each of the CLIP's 8-pixel patches sees 2 x 2 of them. Its image features still carry the
shape (a linear probe reads it about as well as photo's) but their alignment with the class prompts is
off (zero-shot near 30%), which is what adapters can learn. ``OPT_IN_DOMAINS`` are every domain outside
the default world.

numpy + PIL only: the data pipeline imports this in worker processes without paying for torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

DOMAINS: tuple[str, ...] = ("art_painting", "cartoon", "photo", "sketch")
SHIFTED_DOMAIN = "sketch"
COMMON_DOMAINS: tuple[str, ...] = tuple(d for d in DOMAINS if d != SHIFTED_DOMAIN)
CROP_DOMAINS: tuple[str, ...] = ("photo_tight", "photo_loose", "photo_mix90")
STYLE_DOMAINS: tuple[str, ...] = ("pixel_art",)
OPT_IN_DOMAINS: tuple[str, ...] = CROP_DOMAINS + STYLE_DOMAINS
ALL_DOMAINS: tuple[str, ...] = DOMAINS + OPT_IN_DOMAINS  # index = the domain's key in the random stream
PIXEL_ART_CELLS = 16  # pixel_art: cells per side (64 px: 4-pixel cells, two to a CLIP patch)
MIX_LOOSE_EVERY = 10  # photo_mix90: image i is loose when i % 10 == 9, tight otherwise
CLASSES: tuple[str, ...] = ("circle", "cross", "heart", "house", "moon", "star", "triangle")

# Named so captions can say "a red star"; sketch ignores them (pencil only).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 40),
    "orange": (240, 130, 20),
    "yellow": (240, 210, 30),
    "green": (40, 160, 60),
    "blue": (35, 80, 200),
    "purple": (125, 50, 170),
    "pink": (240, 120, 175),
    "brown": (125, 75, 35),
    "grey": (128, 128, 128),
}

# Scale is the object's radius as a fraction of half the image side.
SIZE_WORDS: tuple[tuple[str, float, float], ...] = (("small", 0.42, 0.58), ("medium", 0.58, 0.76), ("large", 0.76, 0.92))

_SUPERSAMPLE = 2  # masks are drawn at 2x and reduced: cheap antialiasing for small images


@dataclass(frozen=True)
class Attributes:
    """What one image shows; captions describe an image from exactly these."""

    domain: str
    class_name: str
    colour: str
    size: str
    scale: float
    rotation: float  # degrees
    centre: tuple[float, float]  # fraction of the image side


def _rng(domain: str, class_name: str, index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, ALL_DOMAINS.index(domain), CLASSES.index(class_name), index])


def framing(domain: str, index: int) -> str | None:
    """"tight", "loose" or None (the four styles frame as they always have)."""
    if domain == "photo_tight":
        return "tight"
    if domain == "photo_loose":
        return "loose"
    if domain == "photo_mix90":
        return "loose" if index % MIX_LOOSE_EVERY == MIX_LOOSE_EVERY - 1 else "tight"
    return None


def _check(domain: str, class_name: str, index: int, seed: int) -> None:
    if domain not in ALL_DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose from {', '.join(ALL_DOMAINS)}")
    if class_name not in CLASSES:
        raise ValueError(f"unknown class {class_name!r}; choose from {', '.join(CLASSES)}")
    if index < 0 or seed < 0:
        raise ValueError("index and seed must be >= 0")


def attributes(domain: str, class_name: str, index: int, seed: int) -> Attributes:
    """The attributes ``render`` draws for these arguments (drawn first from the same random stream)."""
    _check(domain, class_name, index, seed)
    return _draw_attributes(_rng(domain, class_name, index, seed), domain, class_name, index)


def _draw_attributes(rng: np.random.Generator, domain: str, class_name: str, index: int = 0) -> Attributes:
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    size, low, high = SIZE_WORDS[int(rng.integers(len(SIZE_WORDS)))]
    scale = float(rng.uniform(low, high))
    # Bounded rotation keeps every class recognisable (a 180-degree house or moon reads as another shape).
    rotation = float(rng.uniform(-30.0, 30.0))
    room = max(0.0, 1.0 - scale) * 0.5
    centre = (0.5 + float(rng.uniform(-room, room)), 0.5 + float(rng.uniform(-room, room)))
    frame = framing(domain, index)
    if frame == "tight":  # the object fills the frame and its tips are cut off; barely off-centre
        size, scale = "large", float(rng.uniform(1.0, 1.2))
        centre = (0.5 + float(rng.uniform(-0.05, 0.05)), 0.5 + float(rng.uniform(-0.05, 0.05)))
    elif frame == "loose":  # a small object anywhere in a large scene
        size, scale = "small", float(rng.uniform(0.22, 0.34))
        room = (1.0 - scale) * 0.5
        centre = (0.5 + float(rng.uniform(-room, room)), 0.5 + float(rng.uniform(-room, room)))
    return Attributes(domain, class_name, colour, size, scale, rotation, centre)


# --- shapes: outlines in unit coordinates (radius about 1, y down) -------------------------------------


def _circle(n: int = 40) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], 1)


def _cross() -> np.ndarray:
    a, b = 0.32, 0.95
    return np.array(
        [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    )


def _heart(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], 1) / 16.5
    return pts - np.array([0.0, -0.1])


def _house() -> np.ndarray:
    return np.array([(-0.75, 0.95), (-0.75, -0.1), (-0.95, -0.1), (0.0, -0.95), (0.95, -0.1), (0.75, -0.1), (0.75, 0.95)])


def _moon(n: int = 24) -> np.ndarray:
    # Unit circle minus a circle of radius r shifted right by dx: a crescent opening to the right.
    r, dx = 0.85, 0.45
    x_tip = (1 - r * r + dx * dx) / (2 * dx)
    y_tip = math.sqrt(1 - x_tip * x_tip)
    a_out = math.atan2(y_tip, x_tip)
    a_in = math.atan2(y_tip, x_tip - dx)
    t = np.linspace(a_out, 2 * np.pi - a_out, n)
    outer = np.stack([np.cos(t), np.sin(t)], 1)
    s = np.linspace(2 * np.pi - a_in, a_in, n)
    inner = np.stack([dx + r * np.cos(s), r * np.sin(s)], 1)
    return np.concatenate([outer, inner]) + np.array([0.3, 0.0])


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    t = np.arange(2 * points) * np.pi / points - np.pi / 2
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _triangle() -> np.ndarray:
    t = np.array([-90.0, 30.0, 150.0]) * np.pi / 180
    return np.stack([np.cos(t), np.sin(t)], 1) * 1.05 + np.array([0.0, 0.15])


_SHAPES = {
    "circle": _circle(),
    "cross": _cross(),
    "heart": _heart(),
    "house": _house(),
    "moon": _moon(),
    "star": _star(),
    "triangle": _triangle(),
}


def _outline(attrs: Attributes, side: int) -> list[tuple[float, float]]:
    theta = math.radians(attrs.rotation)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    radius = attrs.scale * side / 2
    pts = _SHAPES[attrs.class_name] @ rot.T * radius + np.array(attrs.centre) * side
    return [tuple(p) for p in pts.tolist()]


# --- textures --------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upscaled bicubically."""
    grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8), "L")
    return np.asarray(grid.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float) -> np.ndarray:
    return np.clip(np.array(rgb, dtype=np.float32) + rng.normal(0, amount, 3), 0, 255)


def _mask(outline: list[tuple[float, float]], size: int) -> Image.Image:
    big = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
    ImageDraw.Draw(big).polygon([(x * _SUPERSAMPLE, y * _SUPERSAMPLE) for x, y in outline], fill=255)
    return big.resize((size, size), Image.BOX)


def _compose(background: np.ndarray, fill: np.ndarray, mask: Image.Image) -> np.ndarray:
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    return background * (1 - alpha) + fill * alpha


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


# --- styles ----------------------------------------------------------------------------------------------


def _photo(rng: np.random.Generator, attrs: Attributes, size: int) -> Image.Image:
    # Scene: a muted two-tone gradient (wall / table), low-frequency blotches and sensor grain.
    top, bottom = (_jitter(rng, tuple(rng.integers(70, 190, 3).tolist()), 10) for _ in range(2))
    ramp = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    background = top * (1 - ramp) + bottom * ramp
    background = background * (0.8 + 0.4 * _smooth_noise(rng, size, 5))[..., None]
    background += rng.normal(0, 6, (size, size, 3))

    outline = _outline(attrs, size)
    mask = _mask(outline, size)
    shadow = mask.filter(ImageFilter.GaussianBlur(size / 24))
    shadow = ImageChops.offset(shadow, max(1, size // 24), max(1, size // 16))
    background *= 1 - 0.45 * (np.asarray(shadow, dtype=np.float32)[..., None] / 255.0)

    # Object: directional lighting across its body plus surface texture.
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    light = 0.65 + 0.6 * ((xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle) + 0.5)
    texture = 0.85 + 0.3 * _smooth_noise(rng, size, 12)
    fill = _jitter(rng, COLOURS[attrs.colour], 12) * (light * texture)[..., None]
    fill += rng.normal(0, 5, (size, size, 3))
    return _to_image(_compose(background, fill, mask))


def _pastel(rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.integers(150, 256, 3).astype(np.float32) * 0.35 + 255 * 0.65, 0, 255)


def _cartoon(rng: np.random.Generator, attrs: Attributes, size: int) -> Image.Image:
    image = Image.new("RGB", (size * _SUPERSAMPLE,) * 2, tuple(int(v) for v in _pastel(rng)))
    draw = ImageDraw.Draw(image)
    outline = [(x * _SUPERSAMPLE, y * _SUPERSAMPLE) for x, y in _outline(attrs, size)]
    fill = tuple(int(v) for v in _jitter(rng, COLOURS[attrs.colour], 6))
    width = max(2, round(size * _SUPERSAMPLE / 22))
    draw.polygon(outline, fill=fill)
    draw.line(outline + [outline[0]], fill=(15, 15, 15), width=width, joint="curve")
    # A flat highlight blob, as cartoons draw shine.
    cx, cy = np.mean(outline, axis=0)
    r = attrs.scale * size * _SUPERSAMPLE * 0.09
    hx, hy = cx - r * 2, cy - r * 2
    shine = tuple(int(v) for v in np.clip(np.array(fill) * 0.5 + 255 * 0.5, 0, 255))
    draw.ellipse((hx - r, hy - r, hx + r, hy + r), fill=shine)
    return image.resize((size, size), Image.BOX)


def _strokes(rng: np.random.Generator, size: int, base: np.ndarray, count: int, spread: float) -> Image.Image:
    layer = Image.new("RGB", (size, size), tuple(int(v) for v in base))
    draw = ImageDraw.Draw(layer)
    starts = rng.uniform(-0.1, 1.1, (count, 2)) * size
    angles = rng.normal(rng.uniform(0, np.pi), 0.35, count)  # one dominant brush direction per canvas
    lengths = rng.uniform(0.08, 0.25, count) * size
    colours = np.clip(base + rng.normal(0, spread, (count, 3)), 0, 255).astype(int)
    widths = rng.integers(max(1, size // 32), max(2, size // 12) + 1, count)
    for (x, y), a, length, colour, w in zip(starts, angles, lengths, colours, widths):
        end = (x + length * math.cos(a), y + length * math.sin(a))
        draw.line([(x, y), end], fill=tuple(colour.tolist()), width=int(w))
    return layer


def _art_painting(rng: np.random.Generator, attrs: Attributes, size: int) -> Image.Image:
    canvas_base = rng.integers(90, 220, 3).astype(np.float32) * np.array([1.0, 0.9, 0.7])  # warm, aged palette
    background = np.asarray(_strokes(rng, size, canvas_base, 90, 22), dtype=np.float32)
    fill = np.asarray(_strokes(rng, size, _jitter(rng, COLOURS[attrs.colour], 12), 70, 16), dtype=np.float32)
    # Ragged paint edge: blur the silhouette, then threshold it against noise.
    mask = _mask(_outline(attrs, size), size).filter(ImageFilter.GaussianBlur(size / 40))
    edge_noise = _smooth_noise(rng, size, 16) * 120 - 60
    ragged = np.clip((np.asarray(mask, dtype=np.float32) + edge_noise - 128) * 4 + 128, 0, 255)
    pixels = _compose(background, fill, Image.fromarray(ragged.astype(np.uint8), "L"))
    pixels *= (0.9 + 0.2 * _smooth_noise(rng, size, 24))[..., None]  # canvas weave
    return _to_image(pixels).filter(ImageFilter.SMOOTH)


def _sketch(rng: np.random.Generator, attrs: Attributes, size: int) -> Image.Image:
    paper = int(rng.integers(236, 256))
    big = size * _SUPERSAMPLE
    image = Image.new("L", (big, big), paper)
    draw = ImageDraw.Draw(image)
    outline = np.array(_outline(attrs, size)) * _SUPERSAMPLE
    # Two or three wobbly passes of the pencil, as a hand sketches.
    for _ in range(int(rng.integers(2, 4))):
        wobble = outline + rng.normal(0, size * _SUPERSAMPLE / 140, outline.shape)
        tone = int(rng.integers(20, 90))
        pts = [tuple(p) for p in wobble.tolist()]
        draw.line(pts + [pts[0]], fill=tone, width=int(rng.integers(1, 3)) * _SUPERSAMPLE // 2 + 1)
    # Sparse hatching inside the silhouette, clipped by its mask: shading without colour.
    if rng.random() < 0.6:
        hatch = Image.new("L", (big, big), 0)
        hdraw = ImageDraw.Draw(hatch)
        step = int(rng.integers(5, 9)) * _SUPERSAMPLE
        offset = int(rng.integers(0, step))
        for k in range(-big + offset, big, step):
            hdraw.line([(k, big), (k + big, 0)], fill=int(rng.integers(60, 120)), width=1)
        inside = Image.new("L", (big, big), 0)
        ImageDraw.Draw(inside).polygon([tuple(p) for p in outline.tolist()], fill=255)
        image = ImageChops.subtract(image, ImageChops.multiply(hatch, inside))
    grain = rng.normal(0, 3, (size, size))
    small = np.asarray(image.resize((size, size), Image.BOX), dtype=np.float32) + grain
    return _to_image(np.repeat(small[..., None], 3, axis=2))


def _pixel_art(rng: np.random.Generator, attrs: Attributes, size: int) -> Image.Image:
    # The cartoon drawing averaged into PIXEL_ART_CELLS x PIXEL_ART_CELLS flat cells, shown with hard edges.
    cells = min(PIXEL_ART_CELLS, size)
    return _cartoon(rng, attrs, size).resize((cells, cells), Image.BOX).resize((size, size), Image.NEAREST)


_STYLES = {"art_painting": _art_painting, "cartoon": _cartoon, "photo": _photo, "sketch": _sketch,
           "photo_tight": _photo, "photo_loose": _photo, "photo_mix90": _photo, "pixel_art": _pixel_art}


def render(domain: str, class_name: str, index: int, seed: int, size: int = 64) -> Image.Image:
    """One RGB image of ``class_name`` in style ``domain``; the same arguments always give the same pixels."""
    _check(domain, class_name, index, seed)
    if size < 8:
        raise ValueError("size must be >= 8 pixels")
    rng = _rng(domain, class_name, index, seed)
    attrs = _draw_attributes(rng, domain, class_name, index)
    return _STYLES[domain](rng, attrs, size)
