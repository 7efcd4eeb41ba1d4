"""TimeSformer (Bertasius et al., ICML 2021) with fibo attention: divided space-time, joint, or
space-only attention over the patch tokens of T frames.

Tokens are ``[CLS] + T x P`` patch tokens in time-major order (frame 0's P patches in raster order,
then frame 1's, ...). Divided attention (the paper's default), per block:

1. temporal attention across the T frames at each patch position (no CLS), added back through a
   zero-initialised linear layer ``temporal_fc`` (so a fresh model starts as a per-frame image ViT);
2. spatial attention within each frame over ``[CLS] + P`` tokens, the CLS token repeated per frame
   and its T outputs averaged back into one CLS token;
3. the MLP.

Fibottention (``attention``) applies to spatial attention; ``temporal_attention`` chooses the
temporal pattern (``dense``, or ``same``: the spatial pattern and options over the T frames, no
CLS). ``attention_type=joint`` attends over all ``1 + T*P`` tokens at once (the pattern's offsets
then run along the time-major token order, so offsets < P stay within a frame and multiples of P
link the same patch across frames); ``space_only`` treats frames independently.

The spatial parts keep timm's ViT names (``patch_embed``, ``cls_token``, ``pos_embed``,
``blocks.i.{norm1,attn,norm2,mlp}``, ``norm``, ``head``), so an image checkpoint of fibo's ViT (or
timm ViT weights) initialises the video model through :meth:`TimeSformer.load_image_weights`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from einops import rearrange
from timm.layers import PatchEmbed, build_sincos2d_pos_embed, resample_abs_pos_embed, trunc_normal_
from torch import nn

from fibo.attention import Attention, AttentionSpec
from fibo.models.vit import Block, attention_spec, check_patch_grid

log = logging.getLogger(__name__)
ATTENTION_TYPES = ("divided", "joint", "space_only")
TEMPORAL_ATTENTION = ("dense", "same")


def temporal_spec(spatial: AttentionSpec, temporal_attention: str) -> AttentionSpec:
    """The temporal attention's spec: ``dense`` (with the spatial mask semantics) or ``same`` (the
    spatial pattern and its options, applied over the T frames without CLS).

    Raises:
        ValueError: ``temporal_attention`` is neither.
    """
    if temporal_attention not in TEMPORAL_ATTENTION:
        raise ValueError(f"model.temporal_attention={temporal_attention!r}: choose 'dense' or 'same' "
                         f"(the spatial pattern, here {spatial.name!r}, over the frames)")
    return AttentionSpec(mask_semantics=spatial.mask_semantics) if temporal_attention == "dense" else spatial


def _sincos_1d(length: int, dim: int) -> torch.Tensor:
    """``(length, dim)`` sinusoidal embedding of positions ``0..length-1`` (Vaswani et al. 2017)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float32) * 2 / dim)
    out = torch.zeros(length, dim)
    out[:, : dim // 2] = torch.sin(pos * freq)
    out[:, dim // 2 : 2 * (dim // 2)] = torch.cos(pos * freq)
    return out


class SpaceTimePatchEmbed(nn.Module):
    """Patch embedding that sees ``frames`` consecutive frames per token: a Conv3d with kernel
    ``(frames, p, p)``, stride ``(1, p, p)`` and zero padding in time, so every frame still gets its
    own ``P`` tokens (TimeSformer's token layout) but each token carries local motion. This is the
    3D-convolutional tokeniser of video transformers (ViViT's tubelet embedding, MViT's and Video
    Swin's conv stems) without temporal downsampling. An image checkpoint's 2D kernel loads into the
    central frame (ViViT's "central frame initialisation"), see :meth:`TimeSformer.load_image_weights`.

    Input ``(B, C, T, H, W)``; output ``(B, T, P, D)``.
    """

    def __init__(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int,
                 frames: int) -> None:
        super().__init__()
        if frames < 1 or frames % 2 == 0:
            raise ValueError(f"patch_frames={frames}: use an odd number of frames (1 = per-frame patches, 3, 5, ...)")
        self.grid_size = check_patch_grid(img_size, patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(frames, patch_size, patch_size),
                              stride=(1, patch_size, patch_size), padding=(frames // 2, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "b d t h w -> b t (h w) d")


class DividedBlock(Block):
    """A ViT block (fibo attention, timm layers and names) plus TimeSformer's temporal branch."""

    def __init__(self, dim: int, num_heads: int, *, temporal_attention: AttentionSpec | None = None,
                 attention_type: str = "divided", depth: int = 0, qkv_bias: bool = True, **kwargs: Any) -> None:
        super().__init__(dim, num_heads, depth=depth, qkv_bias=qkv_bias, **kwargs)
        self.attention_type = attention_type
        if attention_type == "divided":
            self.temporal_norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.temporal_attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attention=temporal_attention,
                                           layer_index=depth, num_prefix_tokens=0)
            self.temporal_fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:  # type: ignore[override]
        """``(B, 1 + T*P, D)`` -> same shape."""
        if self.attention_type == "joint":
            return super().forward(x)
        B, _, D = x.shape
        T = num_frames
        cls, patches = x[:, :1], x[:, 1:]
        P = patches.shape[1] // T
        if self.attention_type == "divided":
            xt = rearrange(patches, "b (t p) d -> (b p) t d", t=T)
            res_t = self.temporal_attn(self.temporal_norm1(xt))
            res_t = rearrange(res_t, "(b p) t d -> b (t p) d", b=B)
            patches = patches + self.drop_path1(self.temporal_fc(res_t))
        xs = rearrange(patches, "b (t p) d -> (b t) p d", t=T)
        cls_rep = cls.repeat_interleave(T, dim=0)  # (B*T, 1, D): the CLS token in every frame
        res_s = self.ls1(self.attn(self.norm1(torch.cat([cls_rep, xs], dim=1))))
        cls_out = res_s[:, :1].reshape(B, T, D).mean(dim=1, keepdim=True)  # averaged back over frames
        res_p = rearrange(res_s[:, 1:], "(b t) p d -> b (t p) d", b=B)
        x = torch.cat([cls, patches], dim=1) + self.drop_path1(torch.cat([cls_out, res_p], dim=1))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class TimeSformer(nn.Module):
    """Video transformer over clips ``(B, C, T, H, W)`` -> logits ``(B, num_classes)`` (CLS pooling).

    Args:
        img_size, patch_size: frame side (or ``(H, W)``) and patch side in pixels (divisible).
        num_frames: T, the frames per clip the time embedding is built for (other T are interpolated).
        attention: the ``attention`` config (the pattern of spatial attention); ``attention_type``:
            ``divided`` | ``joint`` | ``space_only``.
        temporal_attention: ``dense`` | ``same`` (the spatial pattern over the frames; divided only).
        patch_frames: frames each patch token is embedded from: 1 = per-frame patches (TimeSformer,
            timm's ``PatchEmbed``), an odd k > 1 = :class:`SpaceTimePatchEmbed` (Conv3d over k frames).
        pretrained: optional path of an image (fibo/timm ViT) or video checkpoint to initialise from.
        other arguments: as timm's VisionTransformer.

    Raises:
        ValueError: bad sizes, unknown attention type, temporal attention or pattern, an
            ``attention.temporal`` key (now ``temporal_attention``).
    """

    modality = "video"  # the task family it serves (fibo.config_check.check_task_model)

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, num_frames: int = 8, in_chans: int = 3,
                 num_classes: int = 400, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, attention: Mapping[str, Any] | AttentionSpec | None = None,
                 attention_type: str = "divided", temporal_attention: str = "dense", patch_frames: int = 1,
                 pretrained: str | None = None) -> None:
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type={attention_type!r}: choose one of {list(ATTENTION_TYPES)}")
        grid = check_patch_grid(img_size, patch_size)
        self.attention_spec = attention_spec(attention)
        self.temporal_spec = temporal_spec(self.attention_spec, temporal_attention)
        self.attention_type, self.num_frames = attention_type, num_frames
        self.num_patch_tokens = grid[0] * grid[1]
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.patch_frames = patch_frames
        if patch_frames == 1:  # TimeSformer: each frame's patches embedded on their own (timm's PatchEmbed)
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        else:
            self.patch_embed = SpaceTimePatchEmbed(img_size, patch_size, in_chans, embed_dim, patch_frames)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patch_tokens, embed_dim))
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            DividedBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                         drop_path=dpr[i], attention=self.attention_spec, temporal_attention=self.temporal_spec,
                         attention_type=attention_type, depth=i, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self._init_weights()
        self.pretrained_report: dict[str, list[str]] | None = None  # what load_image_weights did (run_tags)
        if pretrained:
            self.load_image_weights(_load_checkpoint(pretrained))

    def _init_weights(self) -> None:
        # Sin-cos position (2D, over the patch grid) and time (1D, over frames) embeddings, kept
        # learnable (as MAE initialises ViT position embeddings). With the usual small random or zero
        # init, a model trained from scratch on few clips stayed at chance for many epochs here: the
        # temporal branch starts at zero, so frame order enters only through the time embedding.
        # Image initialisation (load_image_weights) replaces pos_embed and zeroes time_embed.
        trunc_normal_(self.cls_token, std=0.02)
        with torch.no_grad():
            self.pos_embed.zero_()
            self.pos_embed[0, 1:] = build_sincos2d_pos_embed(list(self.patch_embed.grid_size), dim=self.embed_dim)
            self.time_embed[0] = _sincos_1d(self.num_frames, self.embed_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:  # the temporal branch starts as a no-op
            if hasattr(blk, "temporal_fc"):
                nn.init.zeros_(blk.temporal_fc.weight)
                nn.init.zeros_(blk.temporal_fc.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "time_embed"}

    def _time_embed(self, T: int) -> torch.Tensor:
        if T == self.time_embed.shape[1]:
            return self.time_embed
        return nn.functional.interpolate(self.time_embed.transpose(1, 2), size=T, mode="linear",
                                         align_corners=False).transpose(1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W)`` -> tokens ``(B, 1 + T*P, D)`` after the final norm."""
        if x.ndim != 5:
            raise ValueError(f"TimeSformer expects clips (B, C, T, H, W), got shape {tuple(x.shape)}")
        B, _, T = x.shape[:3]
        if self.patch_frames == 1:
            tokens = rearrange(self.patch_embed(rearrange(x, "b c t h w -> (b t) c h w")), "(b t) p d -> b t p d", b=B)
        else:
            tokens = self.patch_embed(x)  # (B, T, P, D)
        tokens = tokens + self.pos_embed[:, None, 1:] + self._time_embed(T)[:, :, None]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        x = self.pos_drop(torch.cat([cls, rearrange(tokens, "b t p d -> b (t p) d")], dim=1))
        for blk in self.blocks:
            x = blk(x, T)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W)`` -> logits ``(B, num_classes)``."""
        return self.head(self.forward_features(x)[:, 0])

    def attention_density(self) -> dict[str, float]:
        """Densities actually used (mean over layers): spatial attention at P patch tokens (or the
        joint attention at T*P tokens), and ``temporal_density`` over T frames."""
        n = self.num_patch_tokens * (self.num_frames if self.attention_type == "joint" else 1)
        per_layer = [blk.attn.density(n) for blk in self.blocks]
        out = {k: sum(d[k] for d in per_layer) / len(per_layer) for k in per_layer[0]}
        if self.attention_type == "divided":
            out["temporal_density"] = sum(blk.temporal_attn.density(self.num_frames)["density"] for blk in self.blocks) / len(self.blocks)
        return out

    def load_image_weights(self, checkpoint: Mapping[str, Any]) -> dict[str, list[str]]:
        """Initialise from an image ViT (fibo/Lightning checkpoint or timm state dict) or a video
        checkpoint. Position and time embeddings are interpolated to this model's grid and frame
        count; an image checkpoint (no time embedding) sets the time embedding to zero, so that with
        the zero-initialised temporal branch the model starts as the image model applied to every
        frame. Resizing the time embedding (another frame count) or the position embedding (another
        patch grid, also non-square: the checkpoint's grid is square) is logged as a warning and in
        :meth:`run_tags`. A 2D patch kernel goes into the central frame of a 3D one (``patch_frames > 1``;
        a 3D kernel into a per-frame model is summed over time). A classifier head of another
        size is left as initialised. Every key that does not
        load is reported (logged and returned), never silently skipped.

        Returns:
            ``{"missing": [...], "unexpected": [...], "resized": [...], "skipped": [...]}``, e.g.
            ``resized == ["pos_embed (14x14 -> 10x10 patches)", "time_embed (8 -> 16 frames)"]``.

        Raises:
            ValueError: not a state dict, no ViT/TimeSformer key, or a ``pos_embed`` whose patch
                positions are not a square grid and differ from this model's.
        """
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
        if not isinstance(state, Mapping):
            raise ValueError(f"model.pretrained: expected a state dict or a Lightning checkpoint, got {type(state).__name__}")
        state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
        own = self.state_dict()
        if not any(k in own for k in state):
            raise ValueError(f"model.pretrained: none of the checkpoint's {len(state)} keys (e.g. {sorted(state)[:3]}) is a "
                             f"ViT/TimeSformer weight (e.g. patch_embed.proj.weight, blocks.0.attn.qkv.weight): "
                             f"pass an image or video checkpoint written by fibo-run, or timm ViT weights")
        report: dict[str, list[str]] = {"resized": [], "skipped": []}
        if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
            grid = tuple(self.patch_embed.grid_size)
            state["pos_embed"], old = _resample_pos_embed(state["pos_embed"], grid)
            report["resized"].append(f"pos_embed ({old[0]}x{old[1]} -> {grid[0]}x{grid[1]} patches)")
        if "time_embed" not in state:  # an image model: start as that model applied to every frame
            state["time_embed"] = torch.zeros_like(own["time_embed"])
            report["resized"].append("time_embed (zeroed: image checkpoint)")
        elif state["time_embed"].shape != own["time_embed"].shape:
            te = state["time_embed"].transpose(1, 2)
            state["time_embed"] = nn.functional.interpolate(te, size=self.num_frames, mode="linear", align_corners=False).transpose(1, 2)
            report["resized"].append(f"time_embed ({te.shape[-1]} -> {self.num_frames} frames)")
        kernel = state.get("patch_embed.proj.weight")
        if kernel is not None and kernel.ndim != own["patch_embed.proj.weight"].ndim:
            state["patch_embed.proj.weight"] = _convert_patch_kernel(kernel, own["patch_embed.proj.weight"])
            report["resized"].append(f"patch_embed.proj.weight ({kernel.ndim}D -> {own['patch_embed.proj.weight'].ndim}D)")
        for key in list(state):
            if key in own and state[key].shape != own[key].shape:
                report["skipped"].append(f"{key} {tuple(state[key].shape)} != {tuple(own[key].shape)}")
                del state[key]
        result = self.load_state_dict(state, strict=False)
        report["missing"], report["unexpected"] = list(result.missing_keys), list(result.unexpected_keys)
        for kind in ("missing", "unexpected", "skipped"):
            if report[kind]:
                log.warning("load_image_weights: %d %s key(s): %s", len(report[kind]), kind, ", ".join(report[kind][:12])
                            + (" ..." if len(report[kind]) > 12 else ""))
        interpolated = [r for r in report["resized"] if not r.startswith("time_embed (zeroed")]
        if interpolated:  # the model differs from the checkpoint's in frames or grid: say so, it changes results
            log.warning("load_image_weights: resized to this model: %s", "; ".join(interpolated))
        self.pretrained_report = report
        return report

    def run_tags(self) -> dict[str, str]:
        """MLflow tags of what :meth:`load_image_weights` changed or left out (``model.pretrained_resized``:
        e.g. ``time_embed (8 -> 16 frames); pos_embed (14x14 -> 10x10 patches)``; ``model.pretrained_skipped``);
        empty without ``model.pretrained``. ``fibo-run`` sets them on the run."""
        report = getattr(self, "pretrained_report", None) or {}
        tags = {f"model.pretrained_{kind}": "; ".join(report[kind]) for kind in ("resized", "skipped") if report.get(kind)}
        return {k: v[:5000] for k, v in tags.items()}


def _convert_patch_kernel(kernel: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A 2D patch kernel ``(D, C, p, p)`` into the central frame of a 3D one ``(D, C, k, p, p)``
    (ViViT's central frame initialisation: the video model starts as the image model), or a 3D
    kernel back to 2D by summing over time (the response to a static clip is unchanged)."""
    if kernel.ndim == 4 and target.ndim == 5:
        out = torch.zeros(*kernel.shape[:2], target.shape[2], *kernel.shape[2:], dtype=kernel.dtype)
        out[:, :, target.shape[2] // 2] = kernel
        return out
    if kernel.ndim == 5 and target.ndim == 4:
        return kernel.sum(dim=2)
    return kernel


def _resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """A checkpoint's ``(1, 1 + h*w, D)`` position embedding (CLS first, square patch grid ``h = w``, the
    only grid its shape tells) resampled to ``grid`` ``(H, W)`` (timm's ``resample_abs_pos_embed``,
    bicubic; non-square grids too). Returns it and the checkpoint's grid.

    Raises:
        ValueError: the checkpoint's patch positions are not a square grid (its layout is unknown).
    """
    import math

    positions = pos_embed.shape[1] - 1
    side = math.isqrt(max(positions, 0))
    if positions < 1 or side * side != positions:
        raise ValueError(f"model.pretrained: the checkpoint's pos_embed has {positions} patch positions (+ CLS), not a "
                         f"square grid, so it cannot be resized to this model's {grid[0]}x{grid[1]} patches: use a "
                         f"checkpoint of this image size, or an image size giving {positions} patches")
    return resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=[side, side], num_prefix_tokens=1), (side, side)


def _load_checkpoint(path: str) -> Any:
    """``torch.load`` with errors that name ``model.pretrained`` and the file."""
    from pathlib import Path

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model.pretrained={path} does not exist: pass an image or video checkpoint "
                                f"(e.g. <run dir>/checkpoints/last.ckpt of an image run) or timm ViT weights")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for non-checkpoints
        raise ValueError(f"model.pretrained={path} is not a checkpoint torch.load can read ({type(err).__name__}: {err})") from None
