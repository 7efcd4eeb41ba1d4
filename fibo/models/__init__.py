"""Backbones with pluggable attention and a registry of names."""

from fibo.models.registry import ARCHITECTURES, create_model
from fibo.models.vit import VisionTransformer, check_patch_grid

__all__ = ["ARCHITECTURES", "VisionTransformer", "check_patch_grid", "create_model"]
