"""The best checkpoint's network is an MLflow 3 LoggedModel of its run: signature, input example,
the run's metrics linked, and ``mlflow.pytorch.load_model`` predicts what the checkpoint predicts."""

import torch

from conftest import lifecycle_cfg, mlflow_runs


def test_the_best_checkpoint_is_logged_as_an_mlflow_model_that_loads_and_predicts(tmp_path):
    import mlflow
    import mlflow.pytorch
    from hydra.utils import instantiate

    from fibo.cli import train
    from fibo.logged_model import MODEL_ID_TAG, network_from_checkpoint

    cfg = lifecycle_cfg(tmp_path, "trainer.max_epochs=1", debug="short")
    train(cfg)
    client, (run,) = mlflow_runs(tmp_path, "fibo-debug")
    model_id = run.data.tags[MODEL_ID_TAG]
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == run.info.run_id and logged.name == "model"
    assert logged.tags["fibo.checkpoint"].endswith(".ckpt")
    linked = {m.key: m.value for m in logged.metrics}
    assert linked["test/acc1"] == run.data.metrics["test/acc1"]  # the run's test metrics are the model's
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]

    info = mlflow.models.get_model_info(f"models:/{model_id}")
    sig = info.signature.to_dict()
    assert '"shape": [-1, 1, 16, 16]' in sig["inputs"] and '"shape": [-1, 10]' in sig["outputs"]
    assert info.saved_input_example_info["type"] == "ndarray"

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    loaded = mlflow.pytorch.load_model(f"models:/{model_id}")
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    images = next(iter(datamodule.test_dataloader()))[0]
    assert images.shape[1:] == (1, 16, 16)
    task = instantiate(cfg.task, model=instantiate(cfg.model))
    reference = network_from_checkpoint(task, logged.tags["fibo.checkpoint"])
    with torch.no_grad():
        got, want = loaded(images), reference(images)
    assert got.shape == (len(images), 10)
    assert torch.equal(got, want)
    untrained = instantiate(cfg.model).eval()
    with torch.no_grad():
        assert not torch.allclose(untrained(images), want)  # the checkpoint's weights, not a fresh network
