import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import synthetic
from engine.synthetic import CLASSES, DOMAINS, SHIFTED_DOMAIN, attributes, render

ROOT = Path(__file__).resolve().parent.parent


def test_world_has_the_shape_of_pacs():
    assert DOMAINS == ("art_painting", "cartoon", "photo", "sketch")
    assert len(CLASSES) == 7 and list(CLASSES) == sorted(CLASSES)
    assert all(name.replace("_", "").isalpha() and name.islower() for name in CLASSES)
    assert SHIFTED_DOMAIN in DOMAINS and SHIFTED_DOMAIN not in synthetic.COMMON_DOMAINS


@pytest.mark.parametrize("domain", DOMAINS)
def test_render_is_rgb_and_deterministic(domain):
    image = render(domain, "star", 3, seed=7, size=48)
    assert image.mode == "RGB" and image.size == (48, 48)
    assert np.array_equal(np.asarray(image), np.asarray(render(domain, "star", 3, seed=7, size=48)))


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_argument_changes_the_image(domain):
    base = np.asarray(render(domain, "house", 0, seed=0), dtype=np.int16)
    for other in (render(domain, "house", 1, seed=0), render(domain, "house", 0, seed=1), render(domain, "moon", 0, seed=0)):
        assert np.abs(base - np.asarray(other, dtype=np.int16)).mean() > 2


def test_sketch_has_no_colour_and_a_light_background():
    pixels = np.asarray(render("sketch", "heart", 0, seed=0), dtype=np.int16)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])
    assert np.median(pixels) > 220


def test_cartoon_fill_is_the_named_colour():
    attrs = attributes("cartoon", "circle", 5, seed=3)
    pixels = np.asarray(render("cartoon", "circle", 5, seed=3, size=96), dtype=np.float32)
    cx, cy = (int(c * 96) for c in attrs.centre)
    # Sample below the centre: the shine sits up and to the left.
    patch = pixels[cy + 4 : cy + 8, cx + 2 : cx + 6].reshape(-1, 3).mean(0)
    assert np.abs(patch - np.array(synthetic.COLOURS[attrs.colour])).max() < 40


def test_classes_are_separable_by_silhouette():
    """A nearest-centroid classifier on sketch pixels (the hardest style) beats chance by far."""
    def features(class_name, index):
        gray = np.asarray(render("sketch", class_name, index, seed=0, size=32).convert("L"), dtype=np.float32)
        return (255 - gray).ravel() / 255

    train = {c: np.mean([features(c, i) for i in range(30)], axis=0) for c in CLASSES}
    hits = sum(
        min(CLASSES, key=lambda k: np.linalg.norm(features(c, i) - train[k])) == c for c in CLASSES for i in range(100, 110)
    )
    assert hits / (10 * len(CLASSES)) > 2 / len(CLASSES)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="domain"):
        render("watercolour", "star", 0, 0)
    with pytest.raises(ValueError, match="class"):
        render("photo", "dog", 0, 0)


def test_synthetic_does_not_import_torch():
    code = "import sys, engine.synthetic; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip() == "False"


# --- opt-in styles -------------------------------------------------------------------------------------


def test_pixel_art_is_an_opt_in_style_after_every_older_domain():
    assert "pixel_art" in synthetic.STYLE_DOMAINS and "pixel_art" not in DOMAINS
    assert set(synthetic.OPT_IN_DOMAINS) == set(synthetic.CROP_DOMAINS) | set(synthetic.STYLE_DOMAINS)
    # Appended: every older domain keeps its index in the random stream, so its pictures are unchanged.
    assert synthetic.ALL_DOMAINS[: len(DOMAINS) + len(synthetic.CROP_DOMAINS)] == DOMAINS + synthetic.CROP_DOMAINS


@pytest.mark.parametrize("size", [64, 48, 224])
def test_pixel_art_is_deterministic_and_made_of_flat_cells(size):
    image = render("pixel_art", "star", 3, seed=7, size=size)
    pixels = np.asarray(image, dtype=np.int16)
    assert image.mode == "RGB" and image.size == (size, size)
    assert np.array_equal(pixels, np.asarray(render("pixel_art", "star", 3, seed=7, size=size)))
    cells = synthetic.PIXEL_ART_CELLS
    # Nearest-neighbour upscaling: the picture is exactly a cells x cells grid shown large.
    small = np.asarray(image.resize((cells, cells), resample=0), dtype=np.int16)
    rows = (np.arange(size) * cells) // size
    assert np.array_equal(pixels, small[rows][:, rows])
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) <= cells * cells


def test_pixel_art_differs_from_every_other_style():
    art = np.asarray(render("pixel_art", "house", 0, seed=0), dtype=np.int16)
    for domain in DOMAINS + synthetic.CROP_DOMAINS:
        assert np.abs(art - np.asarray(render(domain, "house", 0, seed=0), dtype=np.int16)).mean() > 2, domain
    for other in (render("pixel_art", "house", 1, seed=0), render("pixel_art", "moon", 0, seed=0)):
        assert np.abs(art - np.asarray(other, dtype=np.int16)).mean() > 2
