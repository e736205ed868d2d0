"""The console's line for a sweep, fed by a Tune callback on the driver: trials done of the grid,
the running trials' steps, the best value so far of the figure trials are ranked by (tune.metric)."""

from __future__ import annotations

import time

from ray.tune import Callback

from rayllm import console


class SweepView:
    """The sweep's progress line: trials done of the grid, the running trials' steps, the best value of
    `metric` (val_loss: lowest; the DPO figures: highest), as tune.metric ranks the trials."""

    def __init__(self, bar, expected: int, max_steps: int, metric: str = "val_loss"):
        self.bar, self.expected, self.max_steps = bar, expected, max_steps
        self.metric, self.higher = metric, metric != "val_loss"
        self.label = "best val" if metric == "val_loss" else f"best {metric}"
        self.started = time.time()
        self.steps: dict[str, int] = {}
        self.best: float | None = None
        self.done: set[str] = set()  # Tune calls on_trial_complete before it marks the trial TERMINATED

    def trial_result(self, trial_id: str, result: dict) -> None:
        if "step" in result:
            self.steps[trial_id] = int(result["step"])
        value = result.get(self.metric)
        if isinstance(value, (int, float)):
            self.best = value if self.best is None else (max if self.higher else min)(self.best, value)

    def trial_done(self, trial_id: str, failed: bool) -> None:
        self.done.add(trial_id)
        step = self.steps.get(trial_id, 0)
        how = "failed" if failed else ("finished" if step >= self.max_steps else "stopped early (ASHA)")
        self.bar.note(f"trial {trial_id} {how} at step {step}/{self.max_steps}")

    def show(self, trials) -> None:
        done = [t for t in trials if t.status in ("TERMINATED", "ERROR") or t.trial_id in self.done]
        running = [t for t in trials if t.status == "RUNNING" and t.trial_id not in self.done]
        parts = [f"trials {len(done)}/{self.expected} done"]
        parts += [f"{t.trial_id} step {self.steps.get(t.trial_id, 0)}/{self.max_steps}" for t in running]
        if self.best is not None:
            parts.append(f"{self.label} {self.best:.4f}")
        parts.append(console.clock_text(time.time() - self.started))
        self.bar.update("  ".join(parts))


class TrialProgress(Callback):
    """Feeds `SweepView` from Tune's driver loop. It holds no state: Tune pickles its callbacks with
    the experiment (and `Tuner.restore` brings back the pickled one), so the view is a class attribute."""

    view: "SweepView | None" = None

    def _show(self, trials, trial=None, result=None, done: bool = False, failed: bool = False) -> None:
        if (view := TrialProgress.view) is not None:
            if trial is not None and result is not None:
                view.trial_result(trial.trial_id, result)
            if done:
                view.trial_done(trial.trial_id, failed)
            view.show(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._show(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._show(trials, trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._show(trials, trial, done=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._show(trials, trial, done=True, failed=True)
