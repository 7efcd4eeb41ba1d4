"""Import shim for pytorchvideo 0.1.5 on current torchvision.

pytorchvideo.transforms imports ``torchvision.transforms.functional_tensor``, which torchvision
renamed to ``_functional_tensor``; registering the new module under the old name fixes the import.
"""

from __future__ import annotations

import sys


def ensure_pytorchvideo_importable() -> None:
    if "torchvision.transforms.functional_tensor" not in sys.modules:
        try:
            import torchvision.transforms._functional_tensor as functional_tensor
        except ImportError:  # an older torchvision still has the public module
            return
        sys.modules["torchvision.transforms.functional_tensor"] = functional_tensor
