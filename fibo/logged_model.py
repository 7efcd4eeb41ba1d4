"""The trained network as an MLflow 3 model (a ``LoggedModel``), logged when a run's training ends.

:func:`log_best_model` takes the best checkpoint's weights (``ModelCheckpoint.best_model_path``; the
EMA weights of a robot policy when the checkpoint has them), puts them into the run's network
(``task.model``: the ViT, TimeSformer or policy, without the Lightning task around it) and logs it
with ``mlflow.pytorch.log_model`` under the name ``model``: with a signature and an input example
of two samples of the data (the first test batch, else the first validation batch), the run as its
source (``source_run_id``), its params, and the run's metrics of the step it is logged at (the test
metrics, the last epoch's) linked to it. Load it and predict::

    model = mlflow.pytorch.load_model(f"models:/{model_id}")   # or "runs:/<run id>/model"
    logits = model(images)                                     # (B, C, H, W) -> (B, num_classes)

The model's id is the run's ``fibo.model_id`` tag. Inputs: images ``(B, C, H, W)``, clips
``(B, C, T, H, W)`` float32 (normalised as the data module does); robot policies take the dict of
normalised observations (``{key: (B, F, ...)}``) and return the normalised action chunk
``(B, T, A)``. The model is pickled (``serialization_format="pickle"``: cloudpickle of the module),
so loading it needs an environment where ``fibo`` imports. Not MLflow 3's default ``pt2``
(``torch.export``): that traces one graph at the example's shapes, so the loaded model would take
batches of two only, and fibo's CPU sparse-attention kernel (a C++ extension) cannot be traced.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("fibo")
EXAMPLE_SAMPLES = 2  # samples in the input example
MODEL_NAME = "model"
MODEL_ID_TAG = "fibo.model_id"


def network_from_checkpoint(task, ckpt_path: str) -> nn.Module:
    """A CPU copy of ``task.model`` in eval mode with the weights of the Lightning checkpoint
    ``ckpt_path`` (its ``ema.module.*`` entries when present: the weights a robot policy is
    evaluated with, else ``model.*``).

    Raises:
        RuntimeError: the checkpoint's weights do not fit the network (``load_state_dict``, strict).
    """
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "model."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    network = copy.deepcopy(task.model).cpu()
    network.load_state_dict(weights, strict=True)
    return network.eval()


def batch_inputs(batch, n: int = EXAMPLE_SAMPLES):
    """The network's input of a data batch, its first ``n`` samples, on the CPU: ``batch[0]`` of an
    ``(inputs, labels, ...)`` batch, the ``obs`` dict of a robot batch (normalised by ``normalizer``
    when given: see :func:`example_input`)."""
    if isinstance(batch, dict):
        return {k: v[:n].detach().cpu().float() for k, v in batch["obs"].items()}
    return batch[0][:n].detach().cpu().float()


def example_input(datamodule, task=None):
    """Inputs of two samples from the first test batch (else validation batch) of ``datamodule``;
    robot observations normalised with the task's normaliser. None when the data module gives none."""
    for name in ("test_dataloader", "val_dataloader"):
        try:
            loader = getattr(datamodule, name)()
            batch = next(iter(loader))
        except Exception:  # noqa: BLE001 - no such split (robot data have no test split), not set up
            continue
        inputs = batch_inputs(batch)
        normalizer = getattr(task, "normalizer", None)
        if isinstance(inputs, dict) and normalizer is not None:
            inputs = {k: v.float() for k, v in normalizer.obs(inputs).items()}
        return inputs
    return None


def _numpy(x) -> Any:
    if isinstance(x, dict):
        return {k: v.numpy() for k, v in x.items()}
    return x.numpy()


@torch.no_grad()
def predict(network: nn.Module, inputs) -> torch.Tensor:
    """``network(inputs)`` without gradients (an image/clip batch, or the dict of observations)."""
    return network(inputs)


def log_best_model(run_id: str, task, datamodule, ckpt_path: str, step: int = 0) -> str | None:
    """Log the network of ``ckpt_path`` (see the module docstring) to MLflow run ``run_id`` (the
    tracking URI is the process's: Lightning's logger set it). Returns the LoggedModel's id, or None
    when nothing was logged (no checkpoint, no input example, or a failure: a warning; model logging
    never fails a run)."""
    if not ckpt_path:
        log.info("no best checkpoint (fast_dev_run, or checkpointing off): no MLflow model is logged")
        return None
    try:
        import mlflow
        import mlflow.pytorch
        from mlflow.models import infer_signature

        network = network_from_checkpoint(task, ckpt_path)
        inputs = example_input(datamodule, task)
        if inputs is None:
            log.warning("no MLflow model logged: the data module gives no test or validation batch for an input example")
            return None
        outputs = predict(network, inputs)
        example = _numpy(inputs)
        signature = infer_signature(example, outputs.numpy())
        requirements = [*mlflow.pytorch.get_default_pip_requirements(), *_pinned("timm", "lightning")]
        info = mlflow.pytorch.log_model(network, name=MODEL_NAME, run_id=run_id, step=int(step), signature=signature,
                                        input_example=example, pip_requirements=requirements,
                                        serialization_format="pickle",
                                        tags={"fibo.checkpoint": str(ckpt_path)})
        mlflow.MlflowClient().set_tag(run_id, MODEL_ID_TAG, info.model_id)
        log.info("MLflow model %s logged (models:/%s) from %s", MODEL_NAME, info.model_id, ckpt_path)
        return info.model_id
    except Exception as err:  # noqa: BLE001
        log.warning("the MLflow model was not logged: %s: %s", type(err).__name__, err)
        return None


def _pinned(*names: str) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in names:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return out
