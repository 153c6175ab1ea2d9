"""Real photographs shipped with this package, for parity checks (no network, no extra
packages).

Sixteen public-domain / CC0 images of varied sizes, aspect ratios and content (colour
photographs, grayscale scenes, textures, text), stored as JPEG under `data/photos`; see
`data/photos/LICENSE.md` for their sources. Grayscale ones are converted to RGB as
upstream does.
"""
from __future__ import annotations

import functools
import os

from PIL import Image

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "photos")

# Order is stable so tests and reports can slice it.
PHOTOGRAPHS = (
    "astronaut.jpg", "coffee.jpg", "chelsea.jpg", "rocket.jpg", "brick.jpg", "gravel.jpg",
    "microaneurysms.jpg", "hubble_deep_field.jpg", "retina.jpg", "ihc.jpg", "camera.jpg",
    "coins.jpg", "text.jpg", "grass.jpg", "cell.jpg", "clock_motion.jpg",
)


def photograph_paths() -> list[str]:
    return [os.path.join(FOLDER, name) for name in PHOTOGRAPHS]


@functools.lru_cache(maxsize=1)
def photographs() -> tuple[tuple[str, Image.Image], ...]:
    """(name, RGB image) for every photograph, decoded once per process."""
    out = []
    for path in photograph_paths():
        with Image.open(path) as img:
            out.append((os.path.basename(path), img.convert("RGB")))
    return tuple(out)
