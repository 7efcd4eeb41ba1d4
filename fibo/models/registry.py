"""Model names, as in timm's registry: ``create_model("vit_small", img_size=224, patch_size=16)``."""

from __future__ import annotations

from typing import Any

from torch import nn

from fibo.models.timesformer import TimeSformer
from fibo.models.vit import VisionTransformer

#: name -> (class, architecture kwargs). Widths follow timm / DeiT (tiny 192, small 384, base 768).
ARCHITECTURES: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "vit_nano": (VisionTransformer, dict(embed_dim=96, depth=4, num_heads=3)),
    "vit_tiny": (VisionTransformer, dict(embed_dim=192, depth=12, num_heads=3)),
    "vit_small": (VisionTransformer, dict(embed_dim=384, depth=12, num_heads=6)),
    "vit_base": (VisionTransformer, dict(embed_dim=768, depth=12, num_heads=12)),
    "timesformer_nano": (TimeSformer, dict(embed_dim=96, depth=4, num_heads=3, drop_path_rate=0.0)),
    "timesformer_small": (TimeSformer, dict(embed_dim=384, depth=12, num_heads=6)),
    "timesformer_base": (TimeSformer, dict(embed_dim=768, depth=12, num_heads=12)),
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build model ``name``; ``kwargs`` override its architecture defaults.

    Raises:
        ValueError: unknown name, listing the known ones.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(ARCHITECTURES)}")
    cls, arch = ARCHITECTURES[name]
    return cls(**{**arch, **kwargs})
