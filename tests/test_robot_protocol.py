"""The robot evaluation protocol (issue #14 item 4): rollouts every K epochs on the same seeds, with the
final, best and last-k success rates; and data.num_demos refused before any demo is simulated."""

import json
from types import SimpleNamespace

import pytest

from fibo.data.robomimic import RobomimicDataModule
from fibo.envs.evaluation import RolloutEvaluation


class Logger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def last(self, key):
        return [m[key] for _, m in self.logged if key in m][-1]


def stub_trainer(tmp_path):
    return SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(broadcast=lambda x, src=0: x),
                           logger=Logger(), default_root_dir=str(tmp_path), global_step=0)


def test_final_best_and_last_k_over_the_evaluations(tmp_path):
    callback = RolloutEvaluation(num_episodes=4, every_n_epochs=2, seed=7, last_k=3)
    rates = {1: 0.25, 3: 0.75, 5: 0.5, 7: 0.75, 9: 0.25}  # epoch -> success rate

    def roll_out(trainer, pl_module, epoch):
        return {"epoch": epoch, "seeds": [7, 8, 9, 10], "rollout/success_rate": rates[epoch]}

    callback._roll_out = roll_out
    trainer = stub_trainer(tmp_path)
    expected = {1: (0.25, 1, 0.25), 3: (0.75, 3, 0.5), 5: (0.75, 3, 0.5), 7: (0.75, 3, 2 / 3), 9: (0.75, 3, 0.5)}
    for epoch, (best, best_epoch, last_k) in expected.items():
        trainer.global_step = 10 * epoch
        callback.evaluate(trainer, None, epoch)
        logger = trainer.logger
        assert logger.last("rollout/success_rate_best") == best  # the earliest of ties: epoch 3, not 7
        assert logger.last("rollout/best_epoch") == best_epoch
        assert logger.last("rollout/success_rate_last_k") == pytest.approx(last_k)  # fewer than k: all so far
        assert logger.last("rollout/evaluations") == len(callback.results)
    callback._log_summary(trainer)
    assert trainer.logger.logged[-1] == (90, {"rollout/success_rate_final": 0.25})
    summary = json.loads((tmp_path / "rollouts" / "summary.json").read_text())
    assert summary == {"success_rate_final": 0.25, "success_rate_best": 0.75, "best_epoch": 3,
                       "success_rate_last_k": pytest.approx(0.5), "evaluations": 5, "last_k": 3,
                       "seeds": [7, 8, 9, 10], "history": [{"epoch": e, "success_rate": r} for e, r in rates.items()]}


def test_evaluation_epochs_follow_every_n_epochs():
    """every_n_epochs=2 over 5 epochs evaluates after epochs 1 and 3 (0-based), and at the end (4)."""
    callback = RolloutEvaluation(every_n_epochs=2)
    callback._active = True
    done = []
    callback.evaluate = lambda trainer, pl_module, epoch: done.append(epoch) or callback.results.append({"epoch": epoch})
    callback._log_summary = lambda trainer: None
    for epoch in range(5):
        callback.on_train_epoch_end(SimpleNamespace(current_epoch=epoch, max_epochs=5), None)
    callback.on_train_end(SimpleNamespace(current_epoch=5, interrupted=False, is_global_zero=True), None)
    assert done == [1, 3, 4]


def test_last_k_must_be_positive():
    with pytest.raises(ValueError) as info:
        RolloutEvaluation(last_k=0)
    assert str(info.value) == "callbacks.rollout.last_k=0 must be >= 1 (evaluations averaged)"


def test_num_demos_out_of_range_is_refused_before_generating(tmp_path, monkeypatch):
    """The file is missing and would be generated (minutes of simulation): data.num_demos beyond the
    training demos data.generate.num_demos makes is refused at construction, and nothing is simulated."""
    import fibo.envs.demos as demos

    monkeypatch.setattr(demos, "write_demos", lambda *a, **k: pytest.fail("demos were generated"))
    path = tmp_path / "lift_d10.hdf5"
    generate = {"env": "lift", "num_demos": 10, "valid_fraction": 0.1}
    with pytest.raises(ValueError) as info:
        RobomimicDataModule(str(path), generate=generate, num_demos=10)
    assert str(info.value) == (
        "data.num_demos=10 is out of range: give an integer from 1 to 9 (all 9 training demos), or data.num_demos=null "
        "for all (checked before generating lift_d10.hdf5: data.generate.num_demos=10 makes 9 training demos; raise it "
        "for more)")
    assert not path.exists()
    dm = RobomimicDataModule(str(path), generate=generate, num_demos=9)  # in range: accepted, generated later
    assert dm.num_demos == 9
    assert demos.valid_count(10, 0.1) == 1 and demos.valid_count(100, 0.1) == 10 and demos.valid_count(1, 0.1) == 0
