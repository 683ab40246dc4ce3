"""Small image-folder data sets (root/domain/class/*.png) for the tests that load real files."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")


def make_image_folder(root: Path, domains=PACS_DOMAINS, classes=PACS_CLASSES, per_class: int = 2,
                      size: tuple[int, int] = (40, 30)) -> Path:
    """``per_class`` distinct flat-colour PNGs a class and domain (colour from the three indices)."""
    for d, domain in enumerate(domains):
        for c, name in enumerate(classes):
            folder = root / domain / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", size, (30 * c % 256, 60 * d % 256, 17 * i % 256)).save(folder / f"{i}.png")
    return root
