"""Which attention pattern a model uses: the parsed form of the Hydra group ``attention``.

Every model takes one :class:`AttentionSpec` (or the mapping it is parsed from) and nothing else
about attention. A spec names a pattern (a mask builder in :data:`PATTERNS`, or ``dense``), the
pattern's own options and how masked entries are treated (``mask_semantics``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fibo.attention.backends import BACKEND_CHOICES
from fibo.attention.baselines import BASELINE_PATTERNS
from fibo.attention.patterns import fibottention_mask

#: name -> mask builder ``f(num_tokens, num_heads, depth, cls_token, **options) -> BoolTensor``;
#: ``dense`` has no builder (no mask at all).
PATTERNS: dict[str, Callable[..., torch.Tensor] | None] = {
    "dense": None,
    "fibottention": fibottention_mask,
    **BASELINE_PATTERNS,  # longformer, bigbird, sparse_transformer, random, dilated (fibo.attention.baselines)
}
_MAIN_PATTERNS = ("dense", "fibottention")

MASK_SEMANTICS = ("neg_inf", "zero_score")
_BUILDER_ARGS = {"num_tokens", "num_heads", "depth", "cls_token"}
_SPEC_KEYS = {"name", "mask_semantics", "backend"}


@dataclass(frozen=True)
class AttentionSpec:
    """A parsed attention config.

    Attributes:
        name: a key of :data:`PATTERNS`.
        mask_semantics: ``neg_inf`` excludes masked entries from the softmax (the sparse semantics);
            ``zero_score`` multiplies the scaled scores by the 0/1 mask before the softmax, so masked
            entries score 0 and still take part (the authors' reference code).
        options: keyword arguments of the pattern's mask builder (e.g. ``modified``, ``w_min``).
        backend: how ``neg_inf`` attention is computed: ``auto`` (default; see
            :func:`fibo.attention.backends.resolve_backend`), ``sdpa`` (dense boolean mask),
            ``sparse`` (fused CPU kernel, O(N |O|)) or ``flex`` (FlexAttention block mask).
    """

    name: str = "dense"
    mask_semantics: str = "neg_inf"
    options: Mapping[str, Any] = field(default_factory=dict)
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.name not in PATTERNS:
            baselines = sorted(set(PATTERNS) - set(_MAIN_PATTERNS))
            raise ValueError(
                f"unknown attention pattern {self.name!r}; choose one of {list(_MAIN_PATTERNS)} "
                f"or a baseline {baselines} (Hydra: attention=<name>)"
            )
        if self.mask_semantics not in MASK_SEMANTICS:
            raise ValueError(
                f"attention.mask_semantics={self.mask_semantics!r} is not one of {list(MASK_SEMANTICS)}"
            )
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"attention.backend={self.backend!r} is not one of {list(BACKEND_CHOICES)}")
        allowed = self.allowed_options(self.name)
        unknown = sorted(set(self.options) - allowed)
        if unknown:
            raise ValueError(
                f"attention={self.name} has no option(s) {unknown}; its options are {sorted(allowed)} "
                f"plus {sorted(_SPEC_KEYS - {'name'})}"
            )
        self._check_option_types()

    def _check_option_types(self) -> None:
        """Options must have the type of the builder's default (bool stays bool: ``bool("no")`` would
        be True; int stays int; float accepts int); a ``None`` default accepts a number or None."""
        builder = PATTERNS[self.name]
        if builder is None:  # dense: no options (unknown ones were rejected above)
            return
        params = inspect.signature(builder).parameters
        for key, value in self.options.items():
            default = params[key].default
            if isinstance(default, bool):
                ok, want = isinstance(value, bool), "true or false"
            elif isinstance(default, int):
                ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
            elif isinstance(default, float) or default is None:
                ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
                want = "a number or null"
            else:
                ok, want = True, ""
            if not ok:
                raise ValueError(f"attention.{key}={value!r} must be {want} (attention={self.name})")

    @staticmethod
    def allowed_options(name: str) -> set[str]:
        builder = PATTERNS[name]
        if builder is None:
            return set()
        return set(inspect.signature(builder).parameters) - _BUILDER_ARGS

    @classmethod
    def parse(cls, config: AttentionSpec | Mapping[str, Any] | None) -> AttentionSpec:
        """Build a spec from a Hydra/OmegaConf or plain mapping ``{name, mask_semantics, **options}``;
        ``None`` means dense. Raises ``ValueError`` naming an unknown pattern or option."""
        if config is None:
            return cls()
        if isinstance(config, AttentionSpec):
            return config
        cfg = dict(config)
        name = cfg.pop("name", "dense")
        semantics = cfg.pop("mask_semantics", "neg_inf")
        backend = cfg.pop("backend", "auto")
        cfg.pop("_target_", None)
        # the temporal pattern of video models (fibo.models.timesformer.split_attention_config);
        # a model without temporal attention has nothing to apply it to
        cfg.pop("temporal", None)
        return cls(name=name, mask_semantics=semantics, options=cfg, backend=backend)

    @property
    def is_dense(self) -> bool:
        return PATTERNS[self.name] is None

    def mask(self, num_tokens: int, num_heads: int, depth: int = 0, cls_token: bool = True) -> torch.Tensor | None:
        """The CPU boolean mask ``(H, L, L)`` of layer ``depth`` (``L = N + 1`` with CLS), or
        ``None`` for dense attention. A row with no allowed key (possible only without CLS and
        for tiny N) gets its diagonal entry, so the softmax never sees an empty row."""
        builder = PATTERNS[self.name]
        if builder is None:
            return None
        mask = builder(num_tokens=num_tokens, num_heads=num_heads, depth=depth, cls_token=cls_token, **self.options)
        empty = ~mask.any(dim=-1)
        if empty.any():
            mask = mask | (torch.eye(mask.shape[-1], dtype=torch.bool) & empty[..., None])
        return mask
