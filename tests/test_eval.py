"""``fibo-eval``: a checkpoint tested again reproduces its run's test/acc1 exactly (logged into the run
as eval/test/acc1); other data go to a child run; bad checkpoints fail as they fail in fibo-run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import _die_with_parent, mlflow_runs

pytestmark = pytest.mark.slow


def fibo_eval(*overrides: str, root: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``fibo-eval`` (``python -m fibo.eval``: the console script exists once ``make setup`` reinstalled)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"FIBO_ROOT": str(root), "PYTHONUNBUFFERED": "1"})
    return subprocess.run([sys.executable, "-m", "fibo.eval", *overrides], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=_die_with_parent)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short digits run (one epoch of 5 batches, tested on 2 batches): (root, best checkpoint)."""
    from conftest import fibo_run

    root = tmp_path_factory.mktemp("eval")
    result = fibo_run("debug=short", "trainer.max_epochs=1", root=root)
    assert result.returncode == 0, result.stderr[-3000:]
    (best,) = (root / "logs" / "runs").glob("*/checkpoints/epoch*.ckpt")
    return root, best


def test_eval_reproduces_the_runs_test_acc1_and_other_data_get_a_child_run(trained):
    root, best = trained
    result = fibo_eval(f"ckpt_path={best}", root=root)
    assert result.returncode == 0, result.stderr[-3000:]
    client, (run,) = mlflow_runs(root, "fibo-debug")
    acc = run.data.metrics["test/acc1"]
    assert run.data.metrics["eval/test/acc1"] == acc  # exactly: same data, same weights, same batches
    assert run.data.metrics["eval/test/loss"] == run.data.metrics["test/loss"]
    assert run.data.tags["eval.ckpt_path"] == str(best.resolve()) and run.data.tags["eval.split"] == "test"
    assert f"fibo-eval: test/acc1 = {acc:.4f}" in result.stdout and f"run {run.info.run_id} (as eval/...)" in result.stdout

    other = fibo_eval(f"ckpt_path={best}", "data.split_seed=1", root=root)  # another test split: other data
    assert other.returncode == 0, other.stderr[-3000:]
    client, runs = mlflow_runs(root, "fibo-debug")
    (child,) = [r for r in runs if r.info.run_id != run.info.run_id]
    assert child.data.tags["mlflow.parentRunId"] == run.info.run_id and child.data.tags["fibo.eval"] == "true"
    assert child.info.status == "FINISHED" and child.info.run_name == f"eval {run.info.run_name} on digits"
    assert child.data.params["data/split_seed"] == "1" and "test/acc1" in child.data.metrics
    inputs = {i.dataset.name: i.dataset.digest for i in child.inputs.dataset_inputs}
    source = {i.dataset.name: i.dataset.digest for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"digits-test"} and inputs["digits-test"] != source["digits-test"]
    assert "eval/test/acc1" not in child.data.metrics and len(client.get_metric_history(run.info.run_id, "eval/test/acc1")) == 1


def _error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-3000:])
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("fibo-eval: error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0][len("fibo-eval: error: "):]


def test_bad_checkpoints_fail_with_fibo_runs_messages(trained, tmp_path):
    from fibo.tracking import load_checkpoint

    root, best = trained
    foreign = tmp_path / "weights.ckpt"
    torch.save({"model": {}}, foreign)
    for path in (tmp_path / "missing.ckpt", foreign):
        with pytest.raises((FileNotFoundError, ValueError)) as err:
            load_checkpoint(str(path))
        assert _error(fibo_eval(f"ckpt_path={path}", root=root)) == " ".join(str(err.value).split())
    message = _error(fibo_eval(f"ckpt_path={best}", "attention=dense", root=root))
    assert message.startswith(f"ckpt_path={best} belongs to MLflow run ") and "attention=dense (was fibottention)" in message
    assert _error(fibo_eval(root=root)).startswith("fibo-eval needs ckpt_path=<a .ckpt written by fibo-run>")


def test_a_store_without_the_run_is_named_and_not_created(trained, tmp_path):
    from fibo.tracking import RUN_ID_KEY

    root, best = trained
    run_id = torch.load(best, map_location="cpu", weights_only=False)[RUN_ID_KEY]
    elsewhere = tmp_path / "other-machine"  # the checkpoint evaluated where its store is not
    elsewhere.mkdir()
    message = _error(fibo_eval(f"ckpt_path={best}", root=elsewhere))
    assert message == (f"ckpt_path={best} belongs to MLflow run {run_id}, which is not in sqlite:///{elsewhere}/mlflow.db "
                       f"(no store there): set MLFLOW_TRACKING_URI (or logger.tracking_uri) to the store the run was "
                       f"trained with")
    assert not (elsewhere / "mlflow.db").exists()  # before: an empty store was created, then the error


def test_a_copied_checkpoint_names_what_differs_from_its_run(trained, tmp_path):
    """Before: a checkpoint copied out of its run folder was evaluated on the defaults (here: the full
    test set instead of the run's 2 batches) without a word."""
    root, best = trained
    copied = tmp_path / "copied.ckpt"
    copied.write_bytes(best.read_bytes())
    result = fibo_eval(f"ckpt_path={copied}", root=root)
    assert result.returncode == 0, result.stderr[-3000:]
    (note,) = [ln for ln in result.stderr.splitlines() if ln.startswith("fibo-eval: note: ")]
    assert note.startswith(f"fibo-eval: note: {copied} has no .hydra/overrides.yaml beside its folder")
    assert "trainer.limit_test_batches: 2 -> unset" in note and note.endswith(
        "(pass the run's overrides, MLflow artifact config/overrides.yaml, to evaluate as it did)")
    assert "default_root_dir" not in note
    # the whole test split is not the run's 2-batch test: a child run, not eval/test/acc1 in the run
    assert "new child run" in result.stdout, result.stdout[-1500:]

    # a run folder whose overrides.yaml is empty (a bare fibo-run) is not a copied checkpoint, even
    # when the command line changes an option
    folder = tmp_path / "bare_run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text("[]\n")
    inside = folder / "checkpoints" / "best.ckpt"
    inside.write_bytes(best.read_bytes())
    result = fibo_eval(f"ckpt_path={inside}", "debug=short", "trainer.max_epochs=1", "data.split_seed=1", root=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fibo-eval: note:" not in result.stderr


def test_another_tasks_data_is_named_as_such(trained):
    root, best = trained
    assert _error(fibo_eval(f"ckpt_path={best}", "data=lift", root=root)) == (
        "data=lift holds robot data, but task=image trains on image data: pass task=robot for data=lift, or "
        "data=<cifar10|cifar100|digits|imagefolder> for task=image")  # before: image size 84 vs patch size 16
