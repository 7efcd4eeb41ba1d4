"""Paired comparison of rollout outcomes: two policies evaluated on the same episode seeds.

:class:`fibo.envs.evaluation.RolloutEvaluation` rolls every run out from the same initial states
(seeds ``seed, seed + 1, ...``) and writes each evaluation's per-episode outcomes to the run's
``rollouts/epoch<E>.json`` artifact (``{"epoch", "seeds", "successes", ...}``) and the protocol's
summary to ``rollouts/summary.json``. Two policies' outcomes on the same seeds are paired: the
episodes that only one of them solves carry the difference, which an exact McNemar test (a two-sided
binomial test on those discordant episodes) judges. Runs of several training seeds are matched by
training seed and their episodes pooled; the pooled test treats every (training seed, episode) pair
as independent, which understates the spread between training seeds: read it with the mean ± std
over seeds (``fibo-compare --metric rollout/success_rate``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: episode seed -> solved
Outcomes = Mapping[int, bool]


@dataclass(frozen=True)
class PairedCounts:
    """Episodes of the same seeds, pooled over matched training seeds: ``both`` solved, ``only_a``,
    ``only_b``, ``neither``; ``p_value``: exact McNemar (two-sided binomial test of ``only_a`` out of
    ``only_a + only_b`` at 1/2; 1.0 when there are no discordant episodes)."""

    both: int
    only_a: int
    only_b: int
    neither: int
    training_seeds: tuple[str, ...]

    @property
    def episodes(self) -> int:
        return self.both + self.only_a + self.only_b + self.neither

    @property
    def p_value(self) -> float:
        discordant = self.only_a + self.only_b
        if discordant == 0:
            return 1.0
        from scipy.stats import binomtest

        return float(binomtest(self.only_a, discordant, 0.5).pvalue)


def pair(a: Outcomes, b: Outcomes) -> tuple[int, int, int, int]:
    """``(both, only_a, only_b, neither)`` over the episode seeds ``a`` and ``b`` share.

    Raises:
        ValueError: they share no episode seed (evaluations on different seeds are not paired).
    """
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two evaluations share no episode seed: rerun them with the same "
                         "callbacks.rollout.seed and num_episodes")
    both = sum(a[s] and b[s] for s in common)
    only_a = sum(a[s] and not b[s] for s in common)
    only_b = sum(b[s] and not a[s] for s in common)
    return both, only_a, only_b, len(common) - both - only_a - only_b


def paired_counts(a: Mapping[str, Outcomes], b: Mapping[str, Outcomes]) -> PairedCounts:
    """Pool :func:`pair` over the training seeds both sides have (``{training seed: outcomes}``).

    Raises:
        ValueError: no training seed in common.
    """
    seeds = tuple(sorted(set(a) & set(b), key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s)))
    if not seeds:
        raise ValueError(f"no training seed in common (seeds {sorted(a)} against {sorted(b)}): pair runs of the "
                         f"same seeds")
    totals = [0, 0, 0, 0]
    for seed in seeds:
        for i, n in enumerate(pair(a[seed], b[seed])):
            totals[i] += n
    return PairedCounts(*totals, training_seeds=seeds)


def outcomes_from_record(record: Mapping) -> dict[int, bool]:
    """``{seed: success}`` of one ``rollouts/epoch<E>.json`` record."""
    return {int(s): bool(ok) for s, ok in zip(record["seeds"], record["successes"], strict=True)}


def final_outcomes(client, run_id: str) -> dict[int, bool] | None:
    """The per-episode outcomes of a run's last evaluation (its ``rollouts/summary.json`` names the
    epoch; ``rollouts/epoch<E>.json`` holds the outcomes), read from the MLflow store through
    ``client`` (an ``MlflowClient``); None when the run has no rollout artifacts."""
    from unittest.mock import patch

    # two tiny files per run: no MLflow progress bars in fibo-compare's output
    with patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}), \
            tempfile.TemporaryDirectory() as tmp:
        try:
            summary = json.loads(Path(client.download_artifacts(run_id, "rollouts/summary.json", tmp)).read_text())
            epoch = summary["history"][-1]["epoch"]
            path = client.download_artifacts(run_id, f"rollouts/epoch{epoch:03d}.json", tmp)
        except Exception:  # noqa: BLE001 - no such artifact (not a robot run, or one that failed early)
            return None
        return outcomes_from_record(json.loads(Path(path).read_text()))


def paired_rows(names: Sequence[str], outcomes: Sequence[Mapping[str, Outcomes]]) -> list[dict[str, str]]:
    """One row per pair of variants (``names[i]`` with ``outcomes[i]``: ``{training seed: outcomes}``)
    that share training and episode seeds: the counts, the success rates on the shared episodes and
    the McNemar p-value."""
    rows = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            try:
                c = paired_counts(outcomes[i], outcomes[j])
            except ValueError:
                continue
            rows.append({"A": names[i], "B": names[j], "training seeds": ",".join(c.training_seeds),
                         "episodes": str(c.episodes), "both": str(c.both), "only A": str(c.only_a),
                         "only B": str(c.only_b), "neither": str(c.neither),
                         "A solved": f"{(c.both + c.only_a) / c.episodes:.1%}",
                         "B solved": f"{(c.both + c.only_b) / c.episodes:.1%}",
                         "McNemar p": f"{c.p_value:.3g}"})
    return rows
