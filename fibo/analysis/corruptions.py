"""Common image corruptions (ImageNet-C / CIFAR-C) through the ``imagecorruptions`` package.

The corruptions are Hendrycks and Dietterich's ("Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019) code as packaged by ``imagecorruptions-imaug`` 1.1.5
(import name ``imagecorruptions``; the maintained fork of ``imagecorruptions`` 1.1.2, whose import
needs ``pkg_resources`` and whose ``glass_blur``/``gaussian_blur`` fail with scikit-image >= 0.19).
All 19 run here: the 15 benchmark corruptions (:data:`COMMON`: noise, blur, weather, digital) and
the 4 held-out validation ones (``speckle_noise``, ``gaussian_blur``, ``spatter``, ``saturate``).

Images are corrupted in pixel space (uint8, before normalisation) at the model's input size, as
ImageNet-C corrupts the 224 px crops. The package refuses sides under 32 px, so a smaller image
(the 16 px digits) is resized up by the smallest integer factor that reaches 32 (bicubic),
corrupted, and resized back (bicubic): the corruption then acts at 32 px scale, which for
blur/noise radii tuned on 224 px images is the closest the package allows. Grey images are
corrupted as RGB (the package's own conversion) and averaged back to one channel. Random
corruptions are seeded per image (``seed`` + index), so a run is reproducible.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

#: The 15 ImageNet-C benchmark corruptions (``imagecorruptions.get_corruption_names("common")``).
COMMON = (
    "gaussian_noise", "shot_noise", "impulse_noise",                      # noise
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",             # blur
    "snow", "frost", "fog",                                               # weather
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",  # digital
)
#: The 4 validation corruptions of the benchmark.
VALIDATION = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
MIN_SIDE = 32  # imagecorruptions refuses smaller images
_SEEDED = {"impulse_noise", "glass_blur"}  # draw from their own generators (``seed=``), the rest from np.random


def _library():
    try:
        import imagecorruptions
    except ImportError as err:
        raise ImportError("corruption robustness needs the imagecorruptions package: "
                          "pip install imagecorruptions-imaug (or corruptions.names=[] to skip it)") from err
    return imagecorruptions


def check_corruptions(names, severities) -> None:
    """Raises ValueError naming an unknown corruption or a severity outside 1-5."""
    known = COMMON + VALIDATION
    for name in names:
        if name not in known:
            raise ValueError(f"unknown corruption {name!r}: choose from {list(known)}")
    for s in severities:
        if s not in (1, 2, 3, 4, 5):
            raise ValueError(f"corruption severity {s!r}: severities are integers 1-5")


def corrupt_array(image: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """``image`` (H, W) or (H, W, 3) uint8 corrupted by ``name`` at ``severity`` (1-5); same shape
    and dtype. Sides under 32 px are handled by resizing (module docstring).

    Raises:
        ValueError: unknown corruption or severity.
    """
    check_corruptions([name], [severity])
    lib = _library()
    h, w = image.shape[:2]
    factor = max(1, math.ceil(MIN_SIDE / min(h, w)))
    work = image
    if factor > 1:
        work = np.asarray(Image.fromarray(image).resize((w * factor, h * factor), Image.BICUBIC))
    kwargs = {"seed": seed} if name in _SEEDED else {}
    state = np.random.get_state()
    try:
        np.random.seed(seed % 2**32)
        out = lib.corrupt(work, severity=severity, corruption_name=name, **kwargs)
    finally:
        np.random.set_state(state)
    out = np.asarray(out, dtype=np.uint8)
    if image.ndim == 2 and out.ndim == 3:
        out = np.round(out.astype(np.float32).mean(-1)).astype(np.uint8)
    if out.shape[:2] != (h, w):  # zoom/frost/... at factor 1 keep the size; a resized one goes back
        out = np.asarray(Image.fromarray(out).resize((w, h), Image.BICUBIC))
    return out


class CorruptedImages(Dataset):
    """``(image, label)`` samples of ``base`` (PIL images) resized to ``img_size`` (bicubic, as the
    evaluation transform does), corrupted (:func:`corrupt_array`), then passed through
    ``transform`` (the data module's evaluation transform: to tensor and normalise)."""

    def __init__(self, base: Dataset, transform, img_size: int, name: str, severity: int, seed: int = 0) -> None:
        check_corruptions([name], [severity])
        self.base, self.transform, self.img_size = base, transform, img_size
        self.name, self.severity, self.seed = name, severity, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        mode = image.mode if image.mode in ("L", "RGB") else "RGB"
        image = image.convert(mode).resize((self.img_size, self.img_size), Image.BICUBIC)
        pixels = corrupt_array(np.asarray(image), self.name, self.severity, self.seed * 1_000_003 + i)
        return self.transform(Image.fromarray(pixels, mode=mode)), label
