"""Rollout evaluation during training (a Lightning callback).

Every ``every_n_epochs`` epochs and after the last one, the environment is recreated from the
dataset's ``env_args`` and the policy runs ``num_episodes`` episodes from seeds ``seed, seed + 1,
...`` (the same initial placements at every evaluation, for every run and policy: paired
comparisons). Logged to the run's logger after each evaluation: ``rollout/success_rate``,
``rollout/success_ci_low`` / ``_high`` (Wilson 95%), ``rollout/mean_length``, ``rollout/episodes``,
``rollout/seconds``, and the protocol robot papers report over the evaluations so far:
``rollout/success_rate_best`` (the maximum; ``rollout/best_epoch``), ``rollout/success_rate_last_k``
(the mean over the last ``last_k`` evaluations, fewer if fewer were made) and ``rollout/evaluations``;
after the last one ``rollout/success_rate_final`` too. To MLflow also an mp4 of the first
``video_episodes`` episodes (``rollouts/epoch<E>.mp4``), the per-seed outcomes
(``rollouts/epoch<E>.json``) and ``rollouts/summary.json`` (every evaluation's epoch and success
rate, final, best, last-k mean).

Rollouts run on global rank zero only (under DDP the other processes wait and receive the record);
the simulator's seeding is its own (no global RNG is touched). A dataset without ``env_args`` trains
normally and the rollouts are refused with a warning that says why; an environment that cannot be
built (or rendered) stops the run before training, naming the reason and how to fix it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger("fibo")


class RolloutEvaluation(L.Callback):
    """See the module docstring.

    Args:
        num_episodes: episodes per evaluation (M).
        every_n_epochs: evaluate after every K-th epoch (0: only at the end).
        at_end: evaluate after the last epoch.
        last_k: how many of the latest evaluations ``rollout/success_rate_last_k`` averages.
        seed: seed of the first episode (demos use other seeds: see :func:`fibo.envs.demos.write_demos`).
        horizon: steps per episode at most (null: the data config's ``rollout_horizon``).
        video_episodes: how many episodes go into the mp4 (0: none).
        video_camera: camera for the video (default: the first image key's, else the env's
            ``default_camera``: ``agentview`` on robosuite, ``corner2`` on metaworld).
        video_size: side of the video frames in pixels.
        num_threads: torch threads while rolling out (null: unchanged).
    """

    def __init__(self, num_episodes: int = 50, every_n_epochs: int = 0, at_end: bool = True, seed: int = 100_000,
                 horizon: int | None = None, video_episodes: int = 3, video_camera: str | None = None,
                 video_size: int = 128, num_threads: int | None = 1, last_k: int = 3) -> None:
        if last_k < 1:
            raise ValueError(f"callbacks.rollout.last_k={last_k} must be >= 1 (evaluations averaged)")
        self.num_episodes, self.every_n_epochs, self.at_end = num_episodes, every_n_epochs, at_end
        self.last_k = int(last_k)
        self.seed, self.horizon = seed, horizon
        self.video_episodes, self.video_camera, self.video_size = video_episodes, video_camera, video_size
        self.num_threads = num_threads
        self.env = None  # on global rank zero only
        self._active = False  # rollouts run (on every process: rank zero rolls out, the others wait)
        self._camera = video_camera
        self.refused: str | None = None
        self.results: list[dict] = []

    # -- environment --------------------------------------------------------------------------------
    def make_env(self, trainer: L.Trainer, pl_module: L.LightningModule):
        """The environment of ``trainer.datamodule``'s ``env_args`` (None, with ``self.refused`` set,
        when the dataset has none). Called on global rank zero only.

        Raises:
            EnvCreationError: the environment cannot be built or rendered.
        """
        from fibo.envs.sim import camera_of, make_env

        datamodule = trainer.datamodule
        env_args = getattr(datamodule, "env_args", None)
        source = str(getattr(datamodule, "path", "the dataset"))
        if not env_args:
            self.refused = (f"{source} has no data.attrs['env_args'], so the environment cannot be recreated: "
                            f"training goes on, rollouts are refused (no rollout/success_rate). Write robomimic's "
                            f"env_args JSON into the file to evaluate by rollouts.")
            log.warning(self.refused)
            if trainer.logger is not None and hasattr(trainer.logger, "experiment") and hasattr(trainer.logger, "run_id"):
                trainer.logger.experiment.set_tag(trainer.logger.run_id, "rollout_refused", self.refused[:5000])
            return None
        env = make_env(env_args, image_keys=list(getattr(pl_module.model, "rgb_keys", [])),
                       image_size=getattr(datamodule, "img_size", None), source=source)
        self._camera = self.video_camera or (camera_of(env.image_keys[0]) if env.image_keys else env.default_camera)
        env.reset(seed=self.seed)
        if self.video_episodes:
            env.render(self._camera, self.video_size)
        self.horizon = self.horizon or int(getattr(datamodule, "rollout_horizon", 150))
        return env

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rank zero builds the environment; every process learns whether rollouts run (or why the
        environment failed: all processes raise, none waits for the others)."""
        from fibo.envs.sim import EnvCreationError

        if trainer.fast_dev_run:
            self.refused = "fast_dev_run"
            return
        error = None
        if trainer.is_global_zero:
            try:
                self.env = self.make_env(trainer, pl_module)
            except EnvCreationError as err:
                error = f"{err} (to train without rollouts: callbacks.rollout=null)"
        error, self.refused, self._active = trainer.strategy.broadcast(
            (error, self.refused, self.env is not None), src=0)
        if error:
            raise EnvCreationError(error)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active:
            if self.at_end and trainer.current_epoch > 0 and not trainer.interrupted:
                last = max(trainer.current_epoch - 1, 0)
                if not self.results or self.results[-1]["epoch"] != last:
                    self.evaluate(trainer, pl_module, last)
            if self.results and trainer.is_global_zero:
                self._log_summary(trainer)
        self._close()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active or not self.every_n_epochs:
            return
        epoch = trainer.current_epoch
        is_last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % self.every_n_epochs == 0 and not (is_last and self.at_end):
            self.evaluate(trainer, pl_module, epoch)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
        self._active = False

    # -- one evaluation -----------------------------------------------------------------------------
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> dict:
        """Roll out on global rank zero (the other processes wait) and broadcast the record, so that
        every process holds the same ``results``. Metrics go to the logger (rank zero), never into
        ``trainer.callback_metrics``; the run's headline reads ``results`` (:func:`fibo.cli.fit_result`)."""
        record = self._roll_out(trainer, pl_module, epoch) if trainer.is_global_zero else None
        record = trainer.strategy.broadcast(record, src=0)
        self.results.append(record)
        if trainer.is_global_zero and trainer.logger is not None:
            summary = self.summary()
            keys = ("success_rate_best", "best_epoch", "success_rate_last_k", "evaluations")
            trainer.logger.log_metrics({f"rollout/{k}": float(summary[k]) for k in keys}, step=trainer.global_step)
        return record

    def summary(self) -> dict:
        """The evaluations so far: ``final`` (the latest success rate), ``success_rate_best`` and its
        ``best_epoch`` (the earliest of ties), ``success_rate_last_k`` (mean of the last ``last_k``),
        ``evaluations``, ``last_k`` and ``history`` (``[{epoch, success_rate}]``); all on the same seeds."""
        rates = [r["rollout/success_rate"] for r in self.results]
        if not rates:
            return {}
        best = max(range(len(rates)), key=lambda i: (rates[i], -i))
        recent = rates[-self.last_k:]
        return {"success_rate_final": rates[-1], "success_rate_best": rates[best],
                "best_epoch": self.results[best]["epoch"], "success_rate_last_k": sum(recent) / len(recent),
                "evaluations": len(rates), "last_k": self.last_k, "seeds": self.results[-1]["seeds"],
                "history": [{"epoch": r["epoch"], "success_rate": r["rollout/success_rate"]} for r in self.results]}

    def _log_summary(self, trainer: L.Trainer) -> None:
        """``rollout/success_rate_final`` and ``rollouts/summary.json`` after the last evaluation."""
        summary = self.summary()
        log.info("rollouts over %d evaluation(s): final %.3f, best %.3f (epoch %d), mean of the last %d %.3f",
                 summary["evaluations"], summary["success_rate_final"], summary["success_rate_best"],
                 summary["best_epoch"], min(self.last_k, summary["evaluations"]), summary["success_rate_last_k"])
        if trainer.logger is not None:
            trainer.logger.log_metrics({"rollout/success_rate_final": float(summary["success_rate_final"])},
                                       step=trainer.global_step)
        out = Path(trainer.default_root_dir) / "rollouts"
        out.mkdir(parents=True, exist_ok=True)
        path = out / "summary.json"
        path.write_text(json.dumps(summary, indent=1))
        logger = trainer.logger
        if logger is not None and hasattr(logger, "run_id") and hasattr(logger.experiment, "log_artifact"):
            logger.experiment.log_artifact(logger.run_id, str(path), "rollouts")

    def _roll_out(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> dict:
        from fibo.envs.rollout import rollout_seeds, run_rollouts

        seeds = rollout_seeds(self.num_episodes, self.seed)
        agent = pl_module.agent()
        was_training = pl_module.training
        pl_module.eval()
        threads = torch.get_num_threads()
        torch.set_num_threads(self.num_threads or threads)  # batch-1 inference: more threads only add overhead
        try:
            with torch.no_grad():
                result = run_rollouts(agent, self.env, seeds, self.horizon, video_episodes=self.video_episodes,
                                      video_camera=self._camera, video_size=self.video_size)
        finally:
            torch.set_num_threads(threads)
            pl_module.train(was_training)
        metrics = {f"rollout/{k}": float(result[k]) for k in ("success_rate", "success_ci_low", "success_ci_high",
                                                              "mean_length", "episodes", "seconds")}
        log.info("epoch %d rollouts: success %.3f [%.3f, %.3f] over %d episodes (mean length %.1f, %.0f s)", epoch,
                 result["success_rate"], result["success_ci_low"], result["success_ci_high"], result["episodes"],
                 result["mean_length"], result["seconds"])
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        record = {"epoch": epoch, "seeds": seeds, "successes": [bool(s) for s in result["successes"]], **metrics}
        self._log_artifacts(trainer, epoch, record, result["frames"])
        return record

    def _log_artifacts(self, trainer: L.Trainer, epoch: int, record: dict, frames) -> None:
        from fibo.envs.rollout import write_mp4

        out = Path(trainer.default_root_dir) / "rollouts"
        out.mkdir(parents=True, exist_ok=True)
        files = [out / f"epoch{epoch:03d}.json"]
        files[0].write_text(json.dumps(record, indent=1))
        if frames:
            try:
                files.append(write_mp4(out / f"epoch{epoch:03d}.mp4", frames))
            except Exception as err:  # noqa: BLE001 - a video must never fail the run
                log.warning("could not write the rollout video: %s", err)
        logger = trainer.logger
        if logger is not None and hasattr(logger, "run_id") and hasattr(logger.experiment, "log_artifact"):
            for path in files:
                logger.experiment.log_artifact(logger.run_id, str(path), "rollouts")
