"""Which attention a model uses: the parsed form of the Hydra group ``attention``.

Every model takes one :class:`AttentionSpec` (or the mapping it is parsed from) and nothing else
about attention. A spec names a pattern (a key of :data:`fibo.attention.patterns.PATTERNS`), the
pattern's own options, how masked entries are treated (``mask_semantics``) and the backend
preference (``backend``, see :mod:`fibo.attention.backends`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fibo.attention.backends import BACKEND_CHOICES
from fibo.attention.patterns import MAIN_PATTERNS, PATTERNS, Pattern

MASK_SEMANTICS = ("neg_inf", "zero_score")
_SPEC_KEYS = {"name", "mask_semantics", "backend"}


@dataclass(frozen=True)
class AttentionSpec:
    """A parsed attention config.

    Attributes:
        name: a key of :data:`~fibo.attention.patterns.PATTERNS`.
        mask_semantics: ``neg_inf`` excludes masked entries from the softmax (the sparse semantics);
            ``zero_score`` multiplies the scaled scores by the 0/1 mask before the softmax, so masked
            entries score 0 and still take part (the authors' reference code).
        options: the pattern's options (e.g. ``modified``, ``w_min``).
        backend: how ``neg_inf`` attention is computed: ``auto`` (default), ``sdpa`` (dense boolean
            mask), ``sparse`` (fused CPU kernel, O(N |O|)), ``flex`` (FlexAttention block mask) or
            ``reference`` (explicit math); see :func:`fibo.attention.backends.choose_backend`.
        pattern: the configured :class:`~fibo.attention.patterns.Pattern` (derived, not compared).

    Raises:
        ValueError: unknown pattern, option, semantics or backend, or an option of the wrong type.
    """

    name: str = "dense"
    mask_semantics: str = "neg_inf"
    options: Mapping[str, Any] = field(default_factory=dict)
    backend: str = "auto"
    pattern: Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.name not in PATTERNS:
            baselines = sorted(set(PATTERNS) - set(MAIN_PATTERNS))
            raise ValueError(
                f"unknown attention pattern {self.name!r}; choose one of {list(MAIN_PATTERNS)} "
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
        object.__setattr__(self, "pattern", PATTERNS[self.name](**self.options))

    @staticmethod
    def allowed_options(name: str) -> set[str]:
        """The option names of pattern ``name``."""
        return set(PATTERNS[name].defaults)

    @classmethod
    def parse(cls, config: AttentionSpec | Mapping[str, Any] | None) -> AttentionSpec:
        """Build a spec from a Hydra/OmegaConf or plain mapping ``{name, mask_semantics, backend, **options}``;
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
        return cls(name=name, mask_semantics=semantics, options=cfg, backend=backend)

    @property
    def is_dense(self) -> bool:
        return self.pattern.is_dense

    def mask(self, num_tokens: int, num_heads: int, depth: int = 0, cls_token: bool = True) -> torch.Tensor | None:
        """The CPU boolean mask ``(H, L, L)`` of layer ``depth`` (``L = N + 1`` with CLS), or ``None``
        for dense attention: ``self.pattern.mask(...)``."""
        return self.pattern.mask(num_tokens, num_heads, depth, cls_token)
