"""What a DataModule reports about the data it actually used (counts, files it left out)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DataReport:
    """``metrics``: name -> value, logged as MLflow metrics (e.g. ``data/skipped_videos``);
    ``texts``: artifact path -> file content, logged as MLflow artifacts (e.g.
    ``data/skipped_videos.tsv``)."""

    metrics: dict[str, float] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
