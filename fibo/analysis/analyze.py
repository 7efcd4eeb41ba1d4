"""``fibo-analyze``'s body: checkpoint -> run config, data, model -> measurements -> MLflow.

Metrics (all into the checkpoint's MLflow run, step 0; ``<key>`` is ``layer_<i>`` or, for
TimeSformer's temporal attention, ``temporal_layer_<i>``):

* ``analysis/acc1``: top-1 accuracy on the split (video: per video, views' softmax summed);
* ``analysis/head_cka_mean``, ``analysis/head_cka_mean/<key>`` (and ``/spatial``, ``/temporal``
  for video): mean off-diagonal linear CKA between the heads' outputs (lower = more diverse);
* ``analysis/attn_distance[/<key>[/head_<h>]]`` (patches; frames for temporal attention) and
  ``analysis/attn_entropy[/<key>[/head_<h>]]`` (nats);
* ``analysis/ablation/<key>/head_<h>`` (accuracy with that head zeroed) and
  ``analysis/ablation_max_drop`` (clean accuracy minus the lowest of them; the head is the tag
  ``analysis.ablation_max_drop_head``);
* image tasks: ``analysis/corruption/<name>/s<k>``, ``analysis/corruption/<name>`` (mean over
  severities) and ``analysis/corruption_mean`` (mean over corruptions and severities).

Figures (artifacts ``analysis/``): ``head_cka.png`` (one heatmap per layer), ``attention_stats.png``,
``ablation.png``, ``corruptions.png``, ``patterns.png`` (each layer's mask per head) and
``cls_attention_<key>.png`` (val inputs; video: per frame); temporal attention has its own
``*_temporal.png`` and no CLS pictures (it has no CLS token).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fibo.analysis import figures
from fibo.analysis.cka import mean_off_diagonal
from fibo.analysis.corruptions import COMMON, VALIDATION, CorruptedImages, check_corruptions
from fibo.analysis.evaluate import accuracy
from fibo.analysis.hooks import attention_sites
from fibo.analysis.loading import build_task, load_checkpoint
from fibo.analysis.measure import cls_attention_maps, head_ablation, heads_pass, patch_grid
from fibo.analysis.target import open_target

log = logging.getLogger("fibo")
SPLITS = ("val", "test")
CORRUPTION_SETS = {"common": COMMON, "all": COMMON + VALIDATION, "validation": VALIDATION,
                   "noise": COMMON[0:3], "blur": COMMON[3:7], "weather": COMMON[7:10], "digital": COMMON[10:15]}


@dataclass
class Summary:
    """What :func:`analyze` logged: ``metrics``, ``tags``, the figure files and the MLflow run."""

    run_id: str
    tracking_uri: str
    child_run: bool
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)


def corruption_names(names: Any) -> list[str]:
    """A set name of :data:`CORRUPTION_SETS` or a list of corruption names -> the list.

    Raises:
        ValueError: an unknown set or corruption name.
    """
    if names is None:
        return []
    if isinstance(names, str):
        if names not in CORRUPTION_SETS:
            raise ValueError(f"corruptions.names={names!r}: choose a set {list(CORRUPTION_SETS)} or a list of names")
        return list(CORRUPTION_SETS[names])
    names = [str(n) for n in names]
    check_corruptions(names, [])
    return names


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_split(split: str) -> None:
    """Raises ValueError unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: the data has no such split; choose split=val or split=test")


def split_loader(datamodule, split: str):
    """The data module's loader for ``split``.

    Raises:
        ValueError: ``split`` is not val/test or the data module has no such split.
    """
    check_split(split)
    try:
        loader = getattr(datamodule, f"{split}_dataloader")()
    except (AttributeError, KeyError, NotImplementedError, TypeError) as err:
        raise ValueError(f"split={split}: {type(datamodule).__name__} has no {split} split ({type(err).__name__}: {err})") from None
    if loader is None or (hasattr(loader, "__len__") and len(loader) == 0):
        raise ValueError(f"split={split}: the {split} split of {type(datamodule).__name__} is empty")
    return loader


def _display(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) -> (H, W) or (H, W, 3) in [0, 1] (min-max scaled: the normalisation undone for viewing)."""
    x = x.float()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    return x[0].numpy() if x.shape[0] == 1 else x[:3].permute(1, 2, 0).numpy()


def _corruptions(task, datamodule, split: str, cfg, device, kind: str) -> tuple[dict, dict]:
    names = corruption_names(cfg.corruptions.names)
    if not names:
        return {}, {}
    if kind != "image":
        log.info("corruption robustness is measured for image tasks only: skipped for this %s run", kind)
        return {}, {}
    severities = [int(s) for s in cfg.corruptions.severities]
    check_corruptions(names, severities)
    dataset = getattr(datamodule, f"{split}_set", None)
    if not (hasattr(dataset, "base") and hasattr(dataset, "transform") and hasattr(datamodule, "img_size")):
        raise ValueError(f"corruptions need an image data module whose {split}_set has .base (PIL images) and "
                         f".transform; {type(datamodule).__name__} has not (set corruptions.names=[] to skip)")
    limit = min(x for x in (cfg.corruptions.max_samples, cfg.max_samples, len(dataset.base)) if x is not None)
    base = torch.utils.data.Subset(dataset.base, range(limit))
    results: dict[str, dict[int, float]] = {}
    for name in names:
        results[name] = {}
        for s in severities:
            data = CorruptedImages(base, dataset.transform, datamodule.img_size, name, s, int(cfg.corruptions.seed))
            loader = torch.utils.data.DataLoader(data, batch_size=getattr(datamodule, "batch_size", 64),
                                                 num_workers=getattr(datamodule, "num_workers", 0))
            results[name][s] = accuracy(task, loader, device)
            log.info("corruption %s severity %d: acc %.4f", name, s, results[name][s])
    metrics = {f"analysis/corruption/{n}/s{s}": a for n, r in results.items() for s, a in r.items()}
    metrics.update({f"analysis/corruption/{n}": float(np.mean(list(r.values()))) for n, r in results.items()})
    metrics["analysis/corruption_mean"] = float(np.mean([a for r in results.values() for a in r.values()]))
    return results, metrics


def analyze(cfg, out_dir: Path) -> Summary:
    """Run every measurement configured in ``cfg`` (``conf/analyze.yaml``) on ``cfg.ckpt_path``,
    write the figures to ``out_dir`` and log everything into the checkpoint's MLflow run (opened
    first, so that an unreachable store fails before the long passes).

    Raises:
        ValueError / FileNotFoundError: see :func:`fibo.analysis.loading.load_checkpoint`,
            :func:`split_loader`, :func:`corruption_names`.
    """
    run = load_checkpoint(cfg.ckpt_path)
    check_split(str(cfg.split))  # before anything is built
    corruption_names(cfg.corruptions.names)  # bad names fail before the long passes
    target = open_target(run.cfg, run.run_id, cfg.tracking_uri)
    try:
        metrics, tags, files = _measure(cfg, run, Path(out_dir))
        target.log_metrics(metrics)
        for key, value in tags.items():
            target.client.set_tag(target.run_id, key, value)
        if files:
            target.log_dir(Path(out_dir), "analysis")
    except BaseException:
        target.close("FAILED")
        raise
    target.close("FINISHED")
    return Summary(target.run_id, target.tracking_uri, target.created, metrics, tags, files)


def _measure(cfg, run, out_dir: Path) -> tuple[dict[str, float], dict[str, str], list[Path]]:
    split, max_samples = str(cfg.split), cfg.max_samples
    device = _device(str(cfg.device))
    datamodule, task = build_task(run)
    task.to(device)
    model = getattr(task, "model", task)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    split_loader(datamodule, split)
    sites = attention_sites(model)
    grid = patch_grid(model)

    log.info("analysing %s (%s, %d attention modules) on the %s split", run.path, run.kind, len(sites), split)
    heads = heads_pass(task, sites, split_loader(datamodule, split), device, grid, max_samples)
    metrics: dict[str, float] = {"analysis/acc1": heads.accuracy}
    tags = {"analysis.split": split, "analysis.checkpoint": str(run.path)}
    means = {key: mean_off_diagonal(torch.from_numpy(m)) for key, m in heads.cka.items()}
    metrics["analysis/head_cka_mean"] = float(np.nanmean(list(means.values())))
    metrics.update({f"analysis/head_cka_mean/{k}": v for k, v in means.items()})
    kinds = sorted({s.kind for s in sites})
    if len(kinds) > 1:
        for kind in kinds:
            metrics[f"analysis/head_cka_mean/{kind}"] = float(np.nanmean([means[s.key] for s in sites if s.kind == kind]))
    for name, values in (("attn_distance", heads.distance), ("attn_entropy", heads.entropy)):
        metrics[f"analysis/{name}"] = float(np.mean([v.mean() for v in values.values()]))
        for key, v in values.items():
            metrics[f"analysis/{name}/{key}"] = float(v.mean())
            metrics.update({f"analysis/{name}/{key}/head_{h}": float(x) for h, x in enumerate(v)})

    ablation = {}
    if cfg.ablation:
        ablation = head_ablation(task, sites, lambda: split_loader(datamodule, split), device, max_samples)
        for key, accs in ablation.items():
            metrics.update({f"analysis/ablation/{key}/head_{h}": float(a) for h, a in enumerate(accs)})
        worst_key = min(ablation, key=lambda k: ablation[k].min())
        metrics["analysis/ablation_max_drop"] = heads.accuracy - float(ablation[worst_key].min())
        tags["analysis.ablation_max_drop_head"] = f"{worst_key}/head_{int(ablation[worst_key].argmin())}"

    corr_results, corr_metrics = _corruptions(task, datamodule, split, cfg, device, run.kind)
    metrics.update(corr_metrics)
    files = _figures(cfg, run, sites, heads, means, ablation, corr_results, datamodule, task, device, grid, out_dir)
    return metrics, tags, files


def _figures(cfg, run, sites, heads, means, ablation, corr_results, datamodule, task, device, grid, out_dir: Path) -> list[Path]:
    files = []
    name = run.cfg.get("run_name") or run.run_dir.name
    title = f"{name} ({split_title(cfg)})"
    for kind in sorted({s.kind for s in sites}):
        group = [s for s in sites if s.kind == kind]
        suffix = "" if kind == "spatial" else "_temporal"
        keys = [s.key for s in group]
        files.append(figures.head_cka({k: heads.cka[k] for k in keys}, means, out_dir / f"head_cka{suffix}.png",
                                      f"head similarity (linear CKA), {title}"))
        files.append(figures.layer_head_maps(
            {"mean attention distance" + (" (frames)" if kind == "temporal" else " (patches)"):
                 np.stack([heads.distance[k] for k in keys]),
             "attention entropy (nats)": np.stack([heads.entropy[k] for k in keys])},
            keys, out_dir / f"attention_stats{suffix}.png", f"attention statistics, {title}"))
        if ablation:
            files.append(figures.layer_head_maps({f"accuracy with the head zeroed (clean {heads.accuracy:.3f})":
                                                      np.stack([ablation[k] for k in keys])},
                                                 keys, out_dir / f"ablation{suffix}.png", f"head ablation, {title}"))
        masks = {}
        for s in group:
            mask = s.module.get_mask(heads.num_tokens[s.key], "cpu")
            masks[s.key] = None if mask is None else mask.numpy()
        files.append(figures.patterns(masks, out_dir / f"patterns{suffix}.png", f"attention pattern per head, {name}"))
    if corr_results:
        files.append(figures.corruption_curves(corr_results, heads.accuracy, out_dir / "corruptions.png"))
    num = int(cfg.pictures.num_inputs or 0)
    if num > 0:
        x = next(iter(split_loader(datamodule, "val")))[0][:num]
        maps = cls_attention_maps(task, sites, x, device, grid)
        if x.ndim == 5:  # video: frames of the first clip
            images = [_display(x[0, :, t]) for t in range(x.shape[2])]
            labels = [f"frame {t}" for t in range(x.shape[2])]
        else:
            images, labels = [_display(xi) for xi in x], [f"val input {i}" for i in range(len(x))]
        for key, m in maps.items():
            files.append(figures.cls_attention(images, m, labels, out_dir / f"cls_attention_{key}.png",
                                               f"CLS-to-patch attention, {key}, {name} (val inputs)"))
    return files


def split_title(cfg) -> str:
    return f"{cfg.split} split" + (f", first {cfg.max_samples}" if cfg.max_samples else "")
