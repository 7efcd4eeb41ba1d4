"""``fibo-analyze``: the Hydra entry point (``conf/analyze.yaml``), beside ``fibo-run``.

    fibo-analyze ckpt_path=logs/runs/<run>/checkpoints/last.ckpt [split=val] [corruptions.names=[fog]]

Bad input (no ``ckpt_path``, a file that is not a fibo checkpoint, a robot run, an unknown split
or corruption, an MLflow server that does not answer) stops with one line naming it and the fix
(exit status 2).
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from fibo.cli import CONF_DIR  # also registers the ${fibo.cwd:} resolver

log = logging.getLogger("fibo")


def run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from fibo.analysis.analyze import analyze
    from fibo.tracking import TrackingError

    out_dir = os.path.join(HydraConfig.get().runtime.output_dir, "analysis")
    try:
        summary = analyze(cfg, out_dir)
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, TrackingError) as err:
        print(f"fibo-analyze: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    m = summary.metrics
    lines = ["", f"fibo-analyze: {cfg.split}/acc1 = {m['analysis/acc1']:.4f}, "
                 f"head_cka_mean = {m['analysis/head_cka_mean']:.4f}"]
    if "analysis/ablation_max_drop" in m:
        lines.append(f"  ablation_max_drop = {m['analysis/ablation_max_drop']:.4f} "
                     f"({summary.tags['analysis.ablation_max_drop_head']})")
    if "analysis/corruption_mean" in m:
        lines.append(f"  corruption_mean = {m['analysis/corruption_mean']:.4f}")
    where = "new child run" if summary.child_run else "run"
    lines += [f"  logged {len(m)} metrics and {len(summary.figures)} figures (artifacts analysis/) into MLflow "
              f"{where} {summary.run_id}", f"  tracking URI: {summary.tracking_uri}", f"  figures: {out_dir}", ""]
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="analyze")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """Console script ``fibo-analyze``."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    _hydra_main()


if __name__ == "__main__":
    sys.exit(main())
