"""Dataset lineage: every run's train/val/test data are MLflow dataset inputs (name, source, digest,
sample count, context), so runs on different data differ visibly in the UI."""

import json
from importlib.resources import files

from conftest import lifecycle_cfg, mlflow_runs


def _inputs(client, run_id) -> dict:
    """context -> (name, digest, source uri, profile) of a run's dataset inputs."""
    out = {}
    for item in client.get_run(run_id).inputs.dataset_inputs:
        tags = {t.key: t.value for t in item.tags}
        d = item.dataset
        out[tags["mlflow.data.context"]] = (d.name, d.digest, json.loads(d.source)["uri"], d.source_type,
                                            json.loads(d.profile))
    return out


def test_a_run_logs_its_three_splits_as_dataset_inputs(tmp_path):
    from fibo.cli import train

    train(lifecycle_cfg(tmp_path))
    train(lifecycle_cfg(tmp_path, "data.train_samples=100", "seed=1"))
    client, runs = mlflow_runs(tmp_path, "fibo-debug")
    full, subset = sorted(runs, key=lambda r: r.data.tags["seed"])
    inputs = _inputs(client, full.info.run_id)
    digits = str(files("sklearn.datasets") / "data" / "digits.csv.gz")
    assert {c: (v[0], v[2], v[3], v[4]["num_samples"]) for c, v in inputs.items()} == {
        "training": ("digits-train", digits, "local", 1300),
        "validation": ("digits-val", digits, "local", 200),
        "test": ("digits-test", digits, "local", 297),
    }
    assert inputs["test"][4] == {"num_samples": 297, "split": "test", "num_classes": 10}
    assert all(len(v[1]) == 10 for v in inputs.values())
    assert len({v[1] for v in inputs.values()}) == 3  # each split its own digest
    other = _inputs(client, subset.info.run_id)
    assert other["training"][4]["num_samples"] == 100 and other["training"][1] != inputs["training"][1]
    assert other["test"][1] == inputs["test"][1] and other["validation"][1] == inputs["validation"][1]


def test_video_and_robot_splits(tmp_path):
    """The clip datasets' videos (a folder per split) and the robot demos (one HDF5 file)."""
    from types import SimpleNamespace

    from fibo.lineage import splits_of

    for split in ("train", "val"):
        (tmp_path / "videos" / split).mkdir(parents=True)
    clips = lambda *names: SimpleNamespace(samples=[(tmp_path / n, i % 2, None) for i, n in enumerate(names)])  # noqa: E731
    video = SimpleNamespace(lists={"train": None, "val": None, "test": None}, root=tmp_path / "videos", num_classes=2,
                            datasets={"train": clips("a.mp4", "b.mp4", "c.mp4"), "val": clips("d.mp4"),
                                      "test": clips("d.mp4")})
    got = {s.split: (s.name, s.source, s.num_samples) for s in splits_of(video)}
    assert got == {"train": ("videos-train", str(tmp_path / "videos" / "train"), 3),
                   "val": ("videos-val", str(tmp_path / "videos" / "val"), 1),
                   "test": ("videos-test", str(tmp_path / "videos" / "val"), 1)}  # no test/: tested on val
    robot = SimpleNamespace(path=tmp_path / "lift.hdf5", info={"lengths": {"demo_0": 40, "demo_1": 50, "demo_2": 45}},
                            train_demos=["demo_0", "demo_1"], valid_demos=["demo_2"])
    got = {s.split: (s.name, s.num_samples, s.profile["num_demos"]) for s in splits_of(robot)}
    assert got == {"train": ("lift-train", 90, 2), "val": ("lift-val", 45, 1)}
