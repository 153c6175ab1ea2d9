"""Real photographs that ship inside installed packages (no network at any time).

Sixteen photographs of varied aspect ratios from scikit-image's bundled data and
scikit-learn's sample images; grayscale ones are converted to RGB as upstream does.
"""
from __future__ import annotations

import functools
import os

from PIL import Image

# file name -> package holding it; order is stable so tests and reports can slice it.
PHOTOGRAPHS = (
    ("astronaut.png", "skimage"), ("coffee.png", "skimage"), ("chelsea.png", "skimage"),
    ("rocket.jpg", "skimage"), ("china.jpg", "sklearn"), ("flower.jpg", "sklearn"),
    ("motorcycle_left.png", "skimage"), ("hubble_deep_field.jpg", "skimage"),
    ("retina.jpg", "skimage"), ("ihc.png", "skimage"), ("camera.png", "skimage"),
    ("coins.png", "skimage"), ("moon.png", "skimage"), ("grass.png", "skimage"),
    ("cell.png", "skimage"), ("clock_motion.png", "skimage"),
)


def _folder(package: str) -> str:
    if package == "skimage":
        import skimage.data
        return os.path.dirname(skimage.data.__file__)
    import sklearn.datasets
    return os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")


def photograph_paths() -> list[str]:
    return [os.path.join(_folder(pkg), name) for name, pkg in PHOTOGRAPHS]


@functools.lru_cache(maxsize=1)
def photographs() -> tuple[tuple[str, Image.Image], ...]:
    """(name, RGB image) for every photograph, decoded once per process."""
    out = []
    for path in photograph_paths():
        with Image.open(path) as img:
            out.append((os.path.basename(path), img.convert("RGB")))
    return tuple(out)
