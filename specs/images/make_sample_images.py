"""Write the folder specs/images/images.yaml reads: 96×96 crops of scikit-image's bundled sample
images, in one class folder per kind of picture (``photo``, ``texture``).

    pip install scikit-image
    python specs/images/make_sample_images.py        # writes specs/images/sample-images/
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CLASSES = {
    "photo": ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"],
    "texture": ["brick", "grass", "gravel", "moon"],
}
CROPS = 96  # side of each crop
PER_CLASS = 48  # crops per class


def make_sample_images(folder: Path, seed: int = 0) -> Path:
    """Write PER_CLASS crops per class under *folder*/<class>/ (PNG; grey pictures as grey PNGs)."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, names in CLASSES.items():
        (folder / label).mkdir(parents=True, exist_ok=True)
        for index in range(PER_CLASS):
            name = names[index % len(names)]
            picture = getattr(skimage.data, name)()
            top = rng.integers(0, picture.shape[0] - CROPS + 1)
            left = rng.integers(0, picture.shape[1] - CROPS + 1)
            Image.fromarray(picture[top : top + CROPS, left : left + CROPS]).save(
                folder / label / f"{name}-{index:02d}.png"
            )
    return folder


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "sample-images"
    print(f"wrote {make_sample_images(target)}")
