"""Policies for imitation on camera images + proprioception: observation encoders -> a head.

Two heads (``conf/model/head/<name>.yaml``, chosen with ``model/head=bc|diffusion``):

* ``bc`` (:class:`BCPolicy`, the default): an MLP regressing the action chunk (``seq_length``
  actions; robomimic's BC, and action chunking when ``seq_length`` > 1).
* ``diffusion`` (:class:`DiffusionPolicy`): Chi et al.'s diffusion policy, a 1-D conv U-Net denoising
  the chunk conditioned on the features of the last ``frame_stack`` observations
  (:mod:`fibo.models.diffusion`).

Both execute ``n_action_steps`` actions of each predicted chunk (receding horizon,
:class:`fibo.tasks.robot.PolicyAgent`). Four kinds of image encoder, chosen by ``encoder``, plug into
either head unchanged:

* ``transformer``: fibo's transformer blocks (:class:`fibo.models.vit.Block`, so Fibottention or dense
  attention from the ``attention`` config) over image tokens plus a CLS token; the tokens come from a
  small convolutional stem (``stem: conv``, the default: a hybrid encoder) or from a ViT patch
  embedding (``stem: patch``); the image feature is the CLS token (``readout: cls``), robomimic's
  spatial-softmax keypoints of the output patch tokens (``keypoints``) or both (``cls_keypoints``).
  ``model=policy_fibo`` / ``model=policy_dense``.
* ``cnn``: the same kind of conv stem followed by robomimic's ``SpatialSoftmax`` keypoints (robomimic's
  standard visual encoder, with a small conv instead of a ResNet-18 for the CPU). ``model=policy_cnn``.
* ``none``: no image input. ``model=policy_blind`` (proprioception only) and ``model=policy_oracle``
  (proprioception + object state, ``object_state=True``; run as ``experiment=robot_oracle``, which
  adds ``object`` to the data's keys) are references for every report.

The observation key ``object`` (the true object state) reaches a policy only with ``object_state=True``.

Inputs: ``obs[key]`` is ``(B, F, 3, H, W)`` float in [0, 1] for image keys and ``(B, F, d)``
(already normalised) for low-dim keys, F = frame stack. Output: ``(B, seq_length, action_dim)``
(normalised actions). Images are randomly cropped to ``crop_size`` in training and centre-cropped
in evaluation (robomimic's CropRandomizer).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fibo.attention import AttentionSpec

log = logging.getLogger(__name__)


def _conv_stem(in_chans: int, channels: Sequence[int], strides: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = in_chans
    for ch, stride in zip(channels, strides):
        layers += [nn.Conv2d(prev, ch, kernel_size=3, stride=stride, padding=1), nn.GroupNorm(min(8, ch), ch), nn.GELU()]
        prev = ch
    return nn.Sequential(*layers)


class TransformerImageEncoder(nn.Module):
    """Image -> tokens (conv stem or patch embedding) -> CLS + position embedding -> fibo blocks -> CLS.

    With the default conv stem (three stride-2 3x3 convs) a 76x76 crop gives a 10x10 grid: N = 100
    patch tokens, where Fibottention's windows (5 ... N // 3) are meaningful.
    """

    def __init__(self, image_size: int = 76, in_chans: int = 3, stem: str = "conv", patch_size: int = 8,
                 stem_channels: Sequence[int] = (32, 64), embed_dim: int = 128, depth: int = 3, num_heads: int = 4,
                 mlp_ratio: float = 2.0, attention: AttentionSpec | Mapping[str, Any] | None = None,
                 readout: str = "cls", num_kp: int = 32) -> None:
        super().__init__()
        if readout not in ("cls", "keypoints", "cls_keypoints"):
            raise ValueError(f"model.readout={readout!r} must be 'cls', 'keypoints' or 'cls_keypoints'")
        from timm.layers import trunc_normal_

        from fibo.models.vit import Block, attention_spec

        if stem == "conv":
            chans = list(stem_channels)
            self.stem = nn.Sequential(_conv_stem(in_chans, chans, [2] * len(chans)),
                                      nn.Conv2d(chans[-1], embed_dim, kernel_size=3, stride=2, padding=1))
        elif stem == "patch":
            self.stem = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
            if image_size % patch_size:  # the paper's ViT-B/8 on 76 px crops: 9 x 9 patches, 4 px unseen
                log.warning("model.stem=patch: the %d px crop is not divisible by model.patch_size=%d, so its last %d "
                            "pixel rows and columns are not seen (%d x %d patches)", image_size, patch_size,
                            image_size % patch_size, image_size // patch_size, image_size // patch_size)
        else:
            raise ValueError(f"model.stem={stem!r} must be 'conv' (convolutional stem) or 'patch' (ViT patch embedding)")
        with torch.no_grad():
            grid = self.stem(torch.zeros(1, in_chans, image_size, image_size)).shape[-2:]
        self.grid = tuple(grid)
        self.num_patch_tokens = grid[0] * grid[1]
        self.spec = attention_spec(attention)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patch_tokens, embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, attention=self.spec, depth=i, mlp_ratio=mlp_ratio,
                                          qkv_bias=True) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.readout = readout
        self.out_dim = 0 if readout == "keypoints" else embed_dim
        if readout != "cls":  # robomimic's SpatialSoftmax over the output patch tokens, as a 2-D map
            from robomimic.models.base_nets import SpatialSoftmax

            self.keypoints = SpatialSoftmax([embed_dim, *self.grid], num_kp=num_kp)
            self.out_dim += 2 * num_kp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        if self.readout == "cls":
            return tokens[:, 0]
        grid = tokens[:, 1:].transpose(1, 2).reshape(len(tokens), -1, *self.grid)
        points = self.keypoints(grid).flatten(1)
        return points if self.readout == "keypoints" else torch.cat([tokens[:, 0], points], dim=1)

    def attention_density(self) -> dict[str, float]:
        per_layer = [blk.attn.density(self.num_patch_tokens) for blk in self.blocks]
        return {k: sum(d[k] for d in per_layer) / len(per_layer) for k in per_layer[0]}


class SpatialSoftmaxEncoder(nn.Module):
    """Conv stem -> robomimic's ``SpatialSoftmax`` (expected x/y of ``num_kp`` keypoints) -> linear."""

    def __init__(self, image_size: int = 76, in_chans: int = 3, stem_channels: Sequence[int] = (32, 64, 64),
                 stem_strides: Sequence[int] = (2, 2, 1), num_kp: int = 32, out_dim: int = 64) -> None:
        super().__init__()
        from robomimic.models.base_nets import SpatialSoftmax

        self.stem = _conv_stem(in_chans, stem_channels, stem_strides)
        with torch.no_grad():
            shape = self.stem(torch.zeros(1, in_chans, image_size, image_size)).shape[1:]
        self.pool = SpatialSoftmax(list(shape), num_kp=num_kp)
        self.proj = nn.Linear(2 * num_kp, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.stem(x)).flatten(1))


class ObservationPolicy(nn.Module):
    """What every policy shares: observation dict -> per-step features ``(B, F, D)`` (image encoders
    on cropped images, then the low-dim observations), F = ``frame_stack``; subclasses add a head.

    Attributes read by the task and the agent: ``rgb_keys``, ``low_dim_keys``, ``frame_stack``,
    ``seq_length`` (actions per prediction), ``n_action_steps`` (actions executed per prediction),
    ``action_normalization`` (``gaussian``: mean/std, ``limits``: the demos' range -> [-1, 1]).
    """

    modality = "robot"  # the task family it serves (fibo.config_check.check_task_model)

    action_normalization = "gaussian"

    def __init__(self, rgb_keys: Sequence[str], low_dim_keys: Mapping[str, int], action_dim: int,
                 image_encoders: Mapping[str, nn.Module] | None = None, frame_stack: int = 1, seq_length: int = 1,
                 image_size: int = 84, crop_size: int | None = 76, n_action_steps: int = 1) -> None:
        super().__init__()
        self.rgb_keys = list(rgb_keys)
        self.low_dim_keys = dict(low_dim_keys)
        if not self.rgb_keys and not self.low_dim_keys:
            raise ValueError("the policy has no inputs: data.rgb_keys and data.low_dim_keys are both empty")
        self.action_dim, self.frame_stack, self.seq_length = int(action_dim), int(frame_stack), int(seq_length)
        self.n_action_steps = check_action_steps(n_action_steps, self.seq_length)
        self.image_size, self.crop_size = int(image_size), int(crop_size or image_size)
        if self.crop_size > self.image_size:
            raise ValueError(f"model.crop_size={self.crop_size} is larger than the images ({self.image_size})")
        self.encoders = nn.ModuleDict(image_encoders or {})
        missing = [k for k in self.rgb_keys if k not in self.encoders]
        if missing:
            raise ValueError(f"no image encoder for {missing}")
        self.feature_dim = sum(enc.out_dim for enc in self.encoders.values()) + sum(self.low_dim_keys.values())

    def crop(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> crops of ``crop_size``: random per image in training, centred otherwise."""
        c, h = self.crop_size, images.shape[-1]
        if c == h:
            return images
        if not self.training:
            o = (h - c) // 2
            return images[..., o:o + c, o:o + c]
        n = images.shape[0]
        oy = torch.randint(0, images.shape[-2] - c + 1, (n,), device=images.device)
        ox = torch.randint(0, h - c + 1, (n,), device=images.device)
        rows = (oy[:, None] + torch.arange(c, device=images.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(c, device=images.device))[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        return images[batch, chans, rows, cols]

    def features(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``obs`` (images ``(B, F, 3, H, W)`` in [0, 1], low-dim ``(B, F, d)`` normalised) -> ``(B, F, D)``."""
        features = []
        for key in self.rgb_keys:
            x = obs[key]
            batch, frames = x.shape[:2]
            x = self.crop(x.reshape(batch * frames, *x.shape[2:]).float())
            features.append(self.encoders[key]((x - 0.5) / 0.25).reshape(batch, frames, -1))
        for key in self.low_dim_keys:
            x = obs[key].float()
            features.append(x.reshape(x.shape[0], x.shape[1], -1))
        return torch.cat(features, dim=-1)

    def attention_density(self) -> dict[str, float]:
        dens = [enc.attention_density() for enc in self.encoders.values() if hasattr(enc, "attention_density")]
        if not dens:
            return {}
        return {k: sum(d[k] for d in dens) / len(dens) for k in dens[0]}


class BCPolicy(ObservationPolicy):
    """Behaviour cloning head: features of the F observations -> MLP -> ``(B, seq_length, action_dim)``
    (an action chunk when ``seq_length`` > 1); see the module docstring."""

    def __init__(self, rgb_keys: Sequence[str], low_dim_keys: Mapping[str, int], action_dim: int,
                 image_encoders: Mapping[str, nn.Module] | None = None, frame_stack: int = 1, seq_length: int = 1,
                 image_size: int = 84, crop_size: int | None = 76, hidden: Sequence[int] = (256, 256),
                 dropout: float = 0.0, n_action_steps: int = 1) -> None:
        super().__init__(rgb_keys, low_dim_keys, action_dim, image_encoders, frame_stack, seq_length, image_size,
                         crop_size, n_action_steps)
        in_dim = self.frame_stack * self.feature_dim
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.GELU()] + ([nn.Dropout(dropout)] if dropout else [])
            in_dim = width
        layers.append(nn.Linear(in_dim, self.seq_length * self.action_dim))
        self.head = nn.Sequential(*layers)

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        features = self.features(obs)
        return self.head(features.flatten(1)).reshape(features.shape[0], self.seq_length, self.action_dim)

    def compute_loss(self, obs: Mapping[str, torch.Tensor], actions: torch.Tensor, loss_fn=F.mse_loss) -> torch.Tensor:
        """``loss_fn(predicted chunk, actions)`` over the whole chunk ``(B, seq_length, A)``."""
        return loss_fn(self(obs), actions)

    def predict(self, obs: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """The (normalised) action chunk ``(B, seq_length, A)``."""
        return self(obs)


class DiffusionPolicy(ObservationPolicy):
    """Diffusion-policy head (Chi et al. 2023; :class:`fibo.models.diffusion.DiffusionHead`): the
    features of the F = ``n_obs_steps`` observations, flattened, condition a 1-D conv U-Net that
    denoises an action chunk of ``seq_length`` = ``horizon`` steps (normalised to [-1, 1]:
    ``action_normalization = "limits"``). ``forward``/``predict`` sample a chunk (DDIM);
    ``compute_loss`` is the DDPM noise-prediction loss.

    Args: those of :class:`ObservationPolicy`, plus ``diffusion``: keyword arguments of
    :class:`~fibo.models.diffusion.DiffusionHead` (``down_dims``, ``num_train_timesteps``,
    ``num_inference_steps``, ...).
    """

    action_normalization = "limits"

    def __init__(self, rgb_keys: Sequence[str], low_dim_keys: Mapping[str, int], action_dim: int,
                 image_encoders: Mapping[str, nn.Module] | None = None, frame_stack: int = 2, seq_length: int = 16,
                 image_size: int = 84, crop_size: int | None = 76, n_action_steps: int = 8,
                 diffusion: Mapping[str, Any] | None = None) -> None:
        from fibo.models.diffusion import DiffusionHead

        super().__init__(rgb_keys, low_dim_keys, action_dim, image_encoders, frame_stack, seq_length, image_size,
                         crop_size, n_action_steps)
        self.diffusion = DiffusionHead(self.action_dim, self.seq_length, self.frame_stack * self.feature_dim,
                                       **dict(diffusion or {}))

    def condition(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.features(obs).flatten(1)

    def forward(self, obs: Mapping[str, torch.Tensor], noisy_actions: torch.Tensor | None = None,
                timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """With ``noisy_actions`` ``(B, seq_length, A)`` and ``timesteps`` ``(B,)``: one denoiser call, the
        predicted noise (or clean chunk) ``(B, seq_length, A)`` (what training runs, and what
        ``LogCost`` counts: encoder + one U-Net pass). Without: :meth:`predict` (a sampled chunk)."""
        if noisy_actions is None:
            return self.predict(obs)
        return self.diffusion.unet(noisy_actions, timesteps, self.condition(obs))

    def compute_loss(self, obs: Mapping[str, torch.Tensor], actions: torch.Tensor, loss_fn=F.mse_loss) -> torch.Tensor:
        """Noise-prediction loss of the chunk ``actions`` ``(B, seq_length, A)`` (DDPM schedule, random steps)."""
        noisy, steps, target = self.diffusion.training_targets(actions)
        return loss_fn(self(obs, noisy, steps), target)

    def predict(self, obs: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """A sampled (normalised) action chunk ``(B, seq_length, A)``: DDIM, ``num_inference_steps`` U-Net
        passes on one encoding of the observations."""
        return self.diffusion.sample(self.condition(obs), generator=generator)


def check_action_steps(n_action_steps: int, seq_length: int) -> int:
    """``n_action_steps`` if it is between 1 and ``seq_length`` (the actions one prediction makes).

    Raises:
        ValueError: one line naming both keys and the fix.
    """
    if isinstance(n_action_steps, bool) or not isinstance(n_action_steps, int) or n_action_steps < 1:
        raise ValueError(f"model.head.n_action_steps={n_action_steps!r} must be a positive integer (actions executed "
                         f"per prediction)")
    if n_action_steps > seq_length:
        raise ValueError(f"model.head.n_action_steps={n_action_steps} is larger than the horizon, {seq_length} actions per "
                         f"prediction (data.seq_length, by default model.head.horizon): set "
                         f"model.head.n_action_steps<={seq_length} or model.head.horizon>={n_action_steps}")
    return n_action_steps


HEADS = ("bc", "diffusion")


def create_policy(encoder: str, rgb_keys: Sequence[str], low_dim_keys: Mapping[str, int], action_dim: int,
                  frame_stack: int = 1, seq_length: int = 1, image_size: int = 84, crop_size: int | None = 76,
                  hidden: Sequence[int] = (256, 256), dropout: float = 0.0, object_state: bool = False,
                  name: str | None = None, head: Mapping[str, Any] | None = None,
                  **encoder_kwargs: Any) -> ObservationPolicy:
    """Build a policy (Hydra target of ``conf/model/base/policy.yaml`` and ``conf/model/policy_*.yaml``).

    Args:
        encoder: ``transformer`` | ``cnn`` | ``none``.
        rgb_keys, low_dim_keys: the observation keys (``{key: dim}`` for low-dim), from the data config.
        frame_stack: observations per prediction (``n_obs_steps`` of a diffusion policy).
        seq_length: actions per prediction (the chunk; a diffusion policy's ``horizon``).
        hidden, dropout: the BC head's MLP (unused by the diffusion head).
        object_state: the policy also gets ``object`` (the true object state, a key of
            ``low_dim_keys``); without it an ``object`` key is left out.
        head: ``conf/model/head/<name>.yaml``: ``{"name": "bc" | "diffusion", "n_action_steps": int, ...}``;
            the diffusion head's other keys go to :class:`~fibo.models.diffusion.DiffusionHead`;
            ``n_obs_steps`` / ``horizon`` are the data windows' defaults (the policy takes ``frame_stack``
            / ``seq_length``; a difference is warned about) and ``ema`` is the task's.
            ``None``: BC executing one action per prediction.
        **encoder_kwargs: :class:`TransformerImageEncoder` (``stem``, ``patch_size``, ``embed_dim``,
            ``depth``, ``num_heads``, ``attention``, ...) or :class:`SpatialSoftmaxEncoder` options.

    Raises:
        ValueError: unknown encoder or head; images given to ``encoder=none``; ``object_state`` without
            an ``object`` key; ``head.n_action_steps`` outside [1, ``seq_length``]; a diffusion horizon the
            U-Net cannot halve (one line each, naming the config key).
    """
    if isinstance(head, str):  # `model.head=diffusion` on the command line replaces the head's config by a string
        raise ValueError(f"model.head={head!r} replaced the head's config by a string: choose the head with "
                         f"model/head={head} (a config group: a slash, not a dot)")
    head = dict(head or {"name": "bc"})
    head_name = head.pop("name", "bc")
    if head_name not in HEADS:
        raise ValueError(f"model.head.name={head_name!r} must be one of {list(HEADS)}: choose the head with "
                         f"model/head=bc or model/head=diffusion")
    head.pop("ema", None)  # the task's (task.ema reads it)
    for key, value, data_key in (("n_obs_steps", frame_stack, "frame_stack"), ("horizon", seq_length, "seq_length")):
        default = head.pop(key, None)
        if default is not None and int(default) != int(value):
            log.warning("data.%s=%s overrides model.head.%s=%s: the policy %s %s", data_key, value, key, default,
                        "sees" if key == "n_obs_steps" else "predicts", f"{value} {'observations' if key == 'n_obs_steps' else 'actions'}")
    n_action_steps = check_action_steps(head.pop("n_action_steps", 1), int(seq_length))
    low_dim_keys = dict(low_dim_keys)
    if object_state and "object" not in low_dim_keys:
        raise ValueError(f"model.object_state=true needs the object state, but data.low_dim_keys has no 'object' "
                         f"(it has {sorted(low_dim_keys)}): run `fibo-run experiment=robot_oracle`, which adds "
                         f"data.low_dim_keys.object=${{data.object_dim}}")
    if not object_state and low_dim_keys.pop("object", None) is not None:
        log.warning("model.object_state=false: the policy leaves out the data's 'object' key (the true object state)")
    crop = int(crop_size or image_size)
    if encoder == "transformer":
        encoders = {k: TransformerImageEncoder(image_size=crop, **encoder_kwargs) for k in rgb_keys}
    elif encoder == "cnn":
        encoder_kwargs.pop("attention", None)
        encoders = {k: SpatialSoftmaxEncoder(image_size=crop, **encoder_kwargs) for k in rgb_keys}
    elif encoder == "none":
        if rgb_keys:
            raise ValueError(f"model.encoder=none takes no images, but model.rgb_keys={list(rgb_keys)}: "
                             f"set model.rgb_keys=[] (policy_blind / policy_oracle do)")
        encoders = {}
    else:
        raise ValueError(f"model.encoder={encoder!r} must be one of 'transformer', 'cnn', 'none'")
    common = dict(image_encoders=encoders, frame_stack=frame_stack, seq_length=seq_length, image_size=image_size,
                  crop_size=crop_size, n_action_steps=n_action_steps)
    if head_name == "diffusion":
        return DiffusionPolicy(rgb_keys, low_dim_keys, action_dim, diffusion=head, **common)
    if head:
        raise ValueError(f"model.head has keys {sorted(head)} that the bc head does not take (it takes name and "
                         f"n_action_steps; its MLP is model.hidden / model.dropout)")
    return BCPolicy(rgb_keys, low_dim_keys, action_dim, hidden=hidden, dropout=dropout, **common)
