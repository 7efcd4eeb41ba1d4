"""Paired rollout comparison (fibo.envs.paired and fibo-compare's paired table, issue #14): episodes on
the same seeds, runs matched by training seed, exact McNemar p-values."""

import json
from math import comb

import pytest

from fibo import compare as fc
from fibo.envs.paired import PairedCounts, pair, paired_counts, paired_rows


def test_pair_counts_only_shared_episode_seeds():
    a = {100: True, 101: True, 102: False, 103: False, 104: True}
    b = {100: True, 101: False, 102: True, 103: False, 999: True}  # 104 / 999: not shared
    assert pair(a, b) == (1, 1, 1, 1)
    with pytest.raises(ValueError) as err:
        pair({1: True}, {2: True})
    assert str(err.value) == ("the two evaluations share no episode seed: rerun them with the same "
                              "callbacks.rollout.seed and num_episodes")


def test_mcnemar_exact_p_value():
    # 1 discordant episode for A, 10 for B: two-sided binomial tail 2 * P(X <= 1 | n=11, p=1/2)
    counts = PairedCounts(both=39, only_a=1, only_b=10, neither=0, training_seeds=("0",))
    assert counts.episodes == 50
    assert counts.p_value == pytest.approx(2 * (comb(11, 0) + comb(11, 1)) / 2 ** 11, rel=1e-12)  # 0.01171875
    assert PairedCounts(5, 0, 0, 5, ("0",)).p_value == 1.0  # no discordant episode: no evidence
    assert PairedCounts(0, 3, 3, 0, ("0",)).p_value == pytest.approx(1.0)


def test_training_seeds_are_matched_and_pooled():
    a = {"0": {1: True, 2: True}, "1": {1: True, 2: False}, "2": {1: False, 2: False}}
    b = {"0": {1: True, 2: False}, "1": {1: False, 2: False}}  # seed 2 missing on b's side
    counts = paired_counts(a, b)
    assert counts.training_seeds == ("0", "1")
    assert (counts.both, counts.only_a, counts.only_b, counts.neither) == (1, 2, 0, 1)
    with pytest.raises(ValueError, match=r"no training seed in common \(seeds \['0'\] against \['5'\]\)"):
        paired_counts({"0": {1: True}}, {"5": {1: True}})
    rows = paired_rows(["fibo", "dense", "other"], [a, b, {"9": {1: True}}])
    assert len(rows) == 1  # "other" shares no training seed: no row
    assert rows[0] == {"A": "fibo", "B": "dense", "training seeds": "0,1", "episodes": "4", "both": "1",
                       "only A": "2", "only B": "0", "neither": "1", "A solved": "75.0%", "B solved": "25.0%",
                       "McNemar p": "0.5"}


def _robot_run(client, exp, tmp_path, model: str, seed: int, epochs_successes: dict[int, list[bool]],
               minutes: float = 1.0) -> str:
    """A FINISHED run with the artifacts RolloutEvaluation writes: rollouts/epoch<E>.json, summary.json."""
    name = f"{model}-lift-s{seed}"
    out = tmp_path / "runs" / name
    run = client.create_run(exp, run_name=name, tags={"choice.task": "robot", "choice.data": "lift",
                                                      "choice.model": model, "choice.attention": "-",
                                                      "seed": str(seed), "output_dir": str(out)},
                            start_time=1_000_000)
    rid = run.info.run_id
    for k, v in {"seed": str(seed), "run_name": name, "model/encoder": model, "paths/output_dir": str(out)}.items():
        client.log_param(rid, k, v)
    folder = out / "rollouts"
    folder.mkdir(parents=True)
    seeds = list(range(100000, 100000 + len(next(iter(epochs_successes.values())))))
    history = []
    for epoch, successes in epochs_successes.items():
        rate = sum(successes) / len(successes)
        (folder / f"epoch{epoch:03d}.json").write_text(json.dumps(
            {"epoch": epoch, "seeds": seeds, "successes": successes, "rollout/success_rate": rate}))
        history.append({"epoch": epoch, "success_rate": rate})
        client.log_artifact(rid, str(folder / f"epoch{epoch:03d}.json"), "rollouts")
    (folder / "summary.json").write_text(json.dumps({"history": history}))
    client.log_artifact(rid, str(folder / "summary.json"), "rollouts")
    client.log_metric(rid, "rollout/success_rate", history[-1]["success_rate"])
    client.set_terminated(rid, "FINISHED", end_time=1_000_000 + int(minutes * 60_000))
    return rid


def test_fibo_compare_pairs_the_final_evaluations(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("robot", artifact_location=str(tmp_path / "artifacts"))
    T, F = True, False
    # fibo: the epoch-9 evaluation differs from the final (epoch 19) one; only the final counts
    _robot_run(client, exp, tmp_path, "policy_fibo", 0, {9: [F, F, F, F], 19: [T, T, F, F]}, minutes=3)
    _robot_run(client, exp, tmp_path, "policy_fibo", 1, {9: [T, T, T, T], 19: [T, F, F, F]}, minutes=5)
    _robot_run(client, exp, tmp_path, "policy_dense", 0, {19: [T, T, T, F]})
    _robot_run(client, exp, tmp_path, "policy_dense", 1, {19: [T, T, T, T]})
    result = fc.compare(["robot"], metric="rollout/success_rate", tracking_uri=uri, out_dir=tmp_path / "out",
                        log=False, quiet=True)
    assert len(result.groups) == 2
    wall = {r["model"]: r["wall_min"] for r in result.records}
    assert wall == {"policy_fibo": pytest.approx(4.0), "policy_dense": pytest.approx(1.0)}  # MLflow start to end
    (row,) = result.paired
    assert {row["A"], row["B"]} == {"policy_fibo", "policy_dense"}
    fibo_first = row["A"] == "policy_fibo"
    # seed 0: both on 0,1; only dense on 2; neither on 3. seed 1: both on 0; only dense on 1,2,3
    assert (row["both"], row["neither"], row["episodes"], row["training seeds"]) == ("3", "1", "8", "0,1")
    assert (row["only A"], row["only B"]) == (("0", "4") if fibo_first else ("4", "0"))
    assert row["McNemar p"] == "0.125"  # 2 * (1/2) ** 4
    md_rows = [ln for ln in (tmp_path / "out" / "paired.md").read_text().splitlines() if ln.startswith("| policy_")]
    assert len(md_rows) == 1 and md_rows[0].endswith("| 87.5% | 37.5% | 0.125 |")


def test_compare_of_image_runs_has_no_paired_table(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("img", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp, run_name="a", tags={"seed": "0"})
    client.log_metric(run.info.run_id, "test/acc1", 0.5)
    client.set_terminated(run.info.run_id, "FINISHED")
    result = fc.compare(["img"], tracking_uri=uri, out_dir=tmp_path / "out", log=False, quiet=True)
    assert result.paired == [] and not (tmp_path / "out" / "paired.md").exists()
