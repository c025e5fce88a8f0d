"""The trainer every task shares: it receives a task and its built model, and trains it.

:func:`train` goes down once and comes back once, as JoeyNMT's ``training.py`` does: it opens the output
directory (:mod:`qkv.train.run_dir`), builds the task named by ``config.task`` (:mod:`qkv.train.tasks`),
lets it prepare its data, seeds, lets it build its model, and hands both to :class:`Trainer`. What differs
between tasks (data, model, the loss of a batch, validation metrics, model files) is the task's
(:class:`~qkv.train.task.Task`); the trainer knows nothing of translation or language modelling.

One *step* is one AdamW update over ``training.accumulate`` batches of the task's stream. The loss of a
step is the sum of the batches' summed losses divided by their loss terms (:meth:`Task.batch_tokens`), so
accumulating ``k`` batches, or splitting them over ``N`` processes (:mod:`qkv.train.ddp`, each rank taking
its :meth:`Task.shard`), computes the update of one batch ``k`` (or ``N``) times as large. Gradients are
clipped to ``training.clip_norm``; on CUDA, ``training.precision`` bf16/fp16 runs the forward passes (and
validation) under autocast, fp16 with a gradient scaler; on CPU training is always fp32.

The run ends at the first of its budgets (:mod:`qkv.train.budget`: ``max_steps``, ``max_epochs``,
``max_time``) or when early stopping says so. Every ``training.valid_every`` steps, and at the end, rank 0
validates (:meth:`Task.validate`); the best score of ``training.early_stopping_metric`` is saved as
``checkpoints/best.safetensors``, and after ``training.patience`` validations without improvement training
stops. Every ``output.checkpoint_every`` steps (and at the end) a full checkpoint is written
(:mod:`qkv.train.checkpoint_io`): model, optimizer, schedule, RNG states of every rank, the position of the
batch stream, step, training time and best score, so ``--resume`` continues with exactly the batches and
random numbers an uninterrupted run would have used. At the end the model chosen by ``output.export`` is
written to the model directory (:mod:`qkv.train.export`) and, when the task has a test split, scored.

Failures stop the run with one message (:class:`TrainError`): an output directory that cannot be written
is found before any work, a write that fails during training (a full disk) names the file and keeps the
checkpoints written before, ``--resume`` names every checkpoint it had to skip and why (and refuses to
start over when none is readable, or to continue another task's run), and Ctrl-C ends with
:class:`TrainInterrupted`, saying which checkpoint ``--resume`` will continue from.

Log (:mod:`qkv.train.run_log`): ``train.log`` (one line per ``output.log_every`` steps with loss, lr, loss
terms per second, gradient norm; one per validation, with the task's own lines), ``metrics.jsonl``, a tqdm
progress bar, and TensorBoard scalars when ``output.tensorboard`` is on.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from qkv.train import checkpoint_io as ckpt
from qkv.train.budget import Budget, format_duration
from qkv.train.checkpoint_upgrade import upgrade_checkpoint
from qkv.train.config import DEFAULT_TASK, Config, ConfigError
from qkv.train.ddp import (
    DistContext,
    barrier,
    broadcast_flag,
    distributed_session,
    gather_tensors,
    no_sync,
    unwrap_model,
    wrap_model,
)
from qkv.train.errors import TrainError, TrainInterrupted, write_failure
from qkv.train.export import average_last, export_files, export_model, load_exported_weights
from qkv.train.run_dir import CHECKPOINT_DIR, open_run_dir
from qkv.train.run_log import RunLog, echo_line
from qkv.train.schedule import WarmupSchedule
from qkv.train.task import Batches, Task, Validation


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        step: the last update done.
        output_dir: the model directory.
        best_metric, best_score, best_step: the early-stopping metric, its best value and when (``None``
            without validation).
        stopped_early: patience ran out before a budget did.
        resumed_from: the checkpoint training continued from, if any.
        exported: which weights are in the model directory (``best``, ``last`` or ``averaged``).
        last_validation: the scores of the last validation (with ``step``).
        test_scores: the exported model's scores on the task's test split (empty without one).
        ended_by: what ended the run: ``max_steps``, ``max_epochs``, ``max_time`` or ``early_stopping``.
    """

    step: int
    output_dir: Path
    best_metric: str
    best_score: float | None
    best_step: int | None
    stopped_early: bool
    resumed_from: Path | None
    exported: str
    last_validation: dict[str, Any] = field(default_factory=dict)
    test_scores: dict[str, Any] = field(default_factory=dict)
    ended_by: str = ""


class Update(NamedTuple):
    """One optimizer step as this rank saw it: summed loss and NLL of its loss terms, their count, and the
    gradient norm before clipping (``None`` without clipping)."""

    loss: float
    nll: float
    tokens: int
    grad_norm: float | None


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """One training run of ``model`` on ``task`` (see the module docstring); :func:`train` builds it.

    Args:
        config: the run's configuration (the trainer reads ``config.training`` and ``config.output``).
        ctx: this process' place among the DDP processes.
        task: the task, prepared (:meth:`Task.prepare` done).
        model: the task's model, built on CPU under the training seed.
        log: the run's log (:func:`qkv.train.run_dir.open_run_dir` opens it).
        resume: continue from the newest readable checkpoint in ``config.output_dir``.
    """

    def __init__(
        self, config: Config, ctx: DistContext, *, task: Task, model: nn.Module, log: RunLog, resume: bool = False
    ) -> None:
        self.config, self.ctx, self.task, self.log = config, ctx, task, log
        t = config.training
        self.out = config.output_dir
        self.ckpt_dir = self.out / CHECKPOINT_DIR
        self.device = ctx.device
        self.model = model.to(self.device)
        self.ddp_model = wrap_model(self.model, ctx)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=t.lr,
            betas=(t.betas[0], t.betas[1]),
            eps=t.adam_eps,
            weight_decay=t.weight_decay,
        )
        # Only the cosine reads max_steps (config requires it there); the others need no horizon.
        horizon = t.max_steps if t.max_steps is not None else max(1, t.warmup_steps)
        self.schedule = WarmupSchedule(
            self.optimizer, t.schedule, lr=t.lr, warmup_steps=t.warmup_steps, max_steps=horizon, min_lr=t.min_lr
        )
        self.amp_dtype: torch.dtype | None = None
        if self.device.type == "cuda" and t.precision != "fp32":
            self.amp_dtype = torch.bfloat16 if t.precision == "bf16" else torch.float16
        elif t.precision != "fp32":
            self.log.line(f"training.precision {t.precision} applies on CUDA only; training in fp32 on {self.device}")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)
        self.batches: Batches = task.train_batches()
        self.budget = Budget(t.max_steps, t.max_epochs, t.max_time)
        self.step = 0
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.bad_validations = 0
        self.last_valid_step = 0
        self.last_checkpoint_step = 0
        self.last_validation: dict[str, Any] = {}
        self.resumed_from: Path | None = None
        self.stopped_early = False
        self.test_scores: dict[str, Any] = {}
        self.seconds_before = 0.0  # training time of the runs this one resumes
        self.started = time.perf_counter()
        # Dropout draws differ between ranks (each sees other rows), reproducibly.
        torch.manual_seed(t.seed + 1 + ctx.rank)
        if resume:
            self._resume()

    # -- resuming ---------------------------------------------------------------------------------------

    def _resume(self) -> None:
        found = ckpt.find_resumable(self.ckpt_dir)
        skipped = "; ".join(f"{path.name}: {reason}" for path, reason in found.skipped)
        if found.path is None or found.checkpoint is None:
            if found.skipped:
                raise TrainError(
                    f"cannot resume: no checkpoint in {self.ckpt_dir} can be read ({skipped}); move or delete "
                    "them to start again from step 0"
                )
            self.log.line(f"--resume: no checkpoint in {self.ckpt_dir}; starting from step 0")
            return
        path, saved = found.path, upgrade_checkpoint(self.model, found.checkpoint)
        for bad, reason in found.skipped:
            self.log.line(
                f"warning: --resume skipped {bad}, which cannot be read ({reason}); continuing from the older "
                f"{path.name}, and training will overwrite {bad.name} when it reaches that step"
            )
        state = saved.state
        saved_task = state.get("task", DEFAULT_TASK)  # checkpoints written before tasks existed: translation
        if saved_task != self.config.task:
            raise TrainError(
                f"cannot resume from {path}: it is a checkpoint of task {saved_task!r} but the config's task is "
                f"{self.config.task!r}; set output.dir to a new directory"
            )
        try:
            self.model.load_state_dict(saved.model)
        except RuntimeError as e:  # torch lists every missing key and shape mismatch
            first = str(e).strip().splitlines()
            raise TrainError(
                f"cannot resume from {path}: it does not fit the model built from the config and the tokenizers "
                f"in {self.out} ({first[-1].strip() if first else e}); were the tokenizers replaced?"
            ) from None
        if saved.optimizer is None:
            raise TrainError(f"{path} has no optimizer state; it is not a step checkpoint")
        self.optimizer.load_state_dict(saved.optimizer)
        self.schedule.load_state_dict(state["schedule"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        # "batcher": the key of the batch position before the task interface (a TokenBatcher's state).
        position = state.get("batches", state.get("batcher"))
        if position is None:
            raise TrainError(f"cannot resume from {path}: it does not record the position of the training batches")
        try:
            self.batches.load_state_dict(position)
        except ValueError as e:
            raise TrainError(f"cannot resume from {path}: {e}") from None
        self.step = int(state["step"])
        best = state.get("best") or {}
        self.best_score, self.best_step = best.get("score"), best.get("step")
        self.bad_validations = int(state.get("bad_validations", 0))
        self.last_valid_step = int(state.get("last_valid_step", 0))
        self.last_checkpoint_step = self.step
        self.stopped_early = bool(state.get("stopped_early", False))
        self.seconds_before = float(state.get("train_seconds", 0.0))
        if not ckpt.restore_rng(saved.rng, state.get("rng", {}), self.ctx.rank):
            self.log.line(
                f"{path} was written by {state.get('world_size')} process(es); rank {self.ctx.rank} has no saved RNG "
                "state, so dropout draws differ from an uninterrupted run"
            )
        self.resumed_from = path
        self.log.line(f"resumed from {path} at step {self.step}")

    # -- one update --------------------------------------------------------------------------------------

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def _update(self, batches: list[Any]) -> Update:
        """One optimizer step over ``batches``."""
        t = self.config.training
        model = self.ddp_model
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        total_tokens = sum(self.task.batch_tokens(b) for b in batches)
        scale = self.ctx.world_size / max(total_tokens, 1)
        loss_total = nll_total = 0.0
        tokens = 0
        for i, batch in enumerate(batches):
            part, weight = self.task.shard(batch)
            with no_sync(model, i == len(batches) - 1), self._autocast():
                result = self.task.loss(model, part, self.device)
                loss = result.loss * (weight * scale)
            self.scaler.scale(loss).backward()
            if weight:
                loss_total += float(result.loss.detach())
                nll_total += result.nll
                tokens += result.tokens
        grad_norm = None
        if t.clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return Update(loss_total, nll_total, tokens, grad_norm)

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        if not self.ctx.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def seconds(self) -> float:
        """Training time so far, resumed runs included."""
        return self.seconds_before + time.perf_counter() - self.started

    def _budget_reached(self) -> str | None:
        """The budget used up (the same answer on every rank: rank 0's clock decides ``max_time``)."""
        seconds = self.seconds()
        if self.ctx.distributed and self.budget.max_time is not None:
            seconds = self.budget.max_time if broadcast_flag(seconds >= self.budget.max_time, self.ctx) else 0.0
        return self.budget.reached(self.step, self.batches.epoch, seconds)

    # -- validation --------------------------------------------------------------------------------------

    def _evaluate(self, measure: Callable[[nn.Module], Validation | None]) -> Validation | None:
        """``measure(model)`` in eval mode, without gradients, under the training autocast."""
        model = unwrap_model(self.ddp_model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self._autocast():
                return measure(model)
        finally:
            model.train(was_training)

    def _validate_and_track(self) -> bool:
        """Validate (rank 0), keep the best, and decide on early stopping; returns whether to stop."""
        t = self.config.training
        metric = self.config.metric
        stop = False
        if self.ctx.is_main:
            found = self._evaluate(lambda model: self.task.validate(model, self.device, self.step))
            assert found is not None, "Task.validate returns a Validation"
            if metric not in found.metrics:
                raise TrainError(
                    f"task {self.task.name} reported no {metric!r} (training.early_stopping_metric); it reported "
                    f"{', '.join(found.metrics) or 'nothing'}"
                )
            result = {"step": self.step, **found.metrics, **found.extra}
            self.last_validation = result
            value = found.metrics[metric]
            lower = metric in self.task.lower_is_better
            improved = self.best_score is None or (value < self.best_score if lower else value > self.best_score)
            if improved:
                self.best_score, self.best_step, self.bad_validations = value, self.step, 0
                best_path = self.ckpt_dir / ckpt.BEST_FILE
                try:
                    ckpt.save_checkpoint(
                        best_path,
                        unwrap_model(self.ddp_model).state_dict(),
                        state={"step": self.step, "metric": metric, "score": value, "validation": result},
                    )
                except OSError as e:
                    raise write_failure("checkpoint", best_path, e) from None
            else:
                self.bad_validations += 1
            stop = t.patience is not None and self.bad_validations >= t.patience
            record = {**result, "best_metric": metric, "best_score": self.best_score, "best_step": self.best_step}
            self.log.metrics({**record, "lr": self._lr()})
            self.log.scalars("valid", found.metrics, self.step)
            self.log.line(
                f"valid step {self.step} | {_scores(found.metrics)} | best {metric} {self.best_score:.4g} at step "
                f"{self.best_step}" + (" (new best)" if improved else f" ({self.bad_validations} without improvement)")
            )
            for line in found.lines:
                self.log.line(line)
            if stop:
                self.log.line(f"early stopping: {metric} did not improve for {t.patience} validations")
        self.last_valid_step = self.step
        return broadcast_flag(stop, self.ctx)

    # -- checkpoints and export --------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write ``step_<step>.safetensors`` (rank 0; every rank contributes its RNG state) and prune."""
        rng, rng_scalars = ckpt.capture_rng(0)
        if self.ctx.distributed:
            rng = {k: v for k, v in rng.items() if not k.startswith("rank")}
            for rank, rank_state in enumerate(gather_tensors(torch.get_rng_state(), self.ctx)):
                rng[f"rank{rank}/torch"] = rank_state
            if self.device.type == "cuda":
                for rank, rank_state in enumerate(gather_tensors(torch.cuda.get_rng_state(self.device), self.ctx)):
                    rng[f"rank{rank}/cuda"] = rank_state
        self.last_checkpoint_step = self.step
        if not self.ctx.is_main:
            return
        state: dict[str, object] = {
            "task": self.config.task,
            "step": self.step,
            "epoch": self.batches.epoch,
            "train_seconds": self.seconds(),
            "best": {"metric": self.config.metric, "score": self.best_score, "step": self.best_step},
            "bad_validations": self.bad_validations,
            "last_valid_step": self.last_valid_step,
            "batches": self.batches.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_scalars,
            "world_size": self.ctx.world_size,
            "stopped_early": self.stopped_early,
        }
        path = self.ckpt_dir / ckpt.STEP_FILE.format(step=self.step)
        try:
            ckpt.save_checkpoint(
                path, self.model.state_dict(), optimizer_state=self.optimizer.state_dict(), state=state, rng=rng
            )
        except OSError as e:
            raise write_failure("checkpoint", path, e) from None
        ckpt.prune_checkpoints(self.ckpt_dir, self.config.output.keep_last)

    def _finish(self) -> str:
        """Average and export (rank 0); returns what was exported."""
        o = self.config.output
        if o.average_last >= 2:
            steps = average_last(self.ckpt_dir, o.average_last)
            self.log.line(f"averaged the checkpoints of steps {', '.join(str(s) for s in steps)}")
        model = unwrap_model(self.ddp_model)
        load_exported_weights(model, self.ckpt_dir, o.export)
        try:
            export_files(lambda directory: self.task.save_model(model, directory), self.out)
        except OSError as e:
            raise write_failure("the model into", self.out, e) from None
        what = {"best": f"best ({self.best_step})", "last": f"last ({self.step})", "averaged": "averaged"}[o.export]
        self.log.line(f"wrote the {what} model to {self.out}")
        return o.export

    def _score_test(self) -> None:
        """Score the exported model (now in ``self.model``) on the task's test split, if any (rank 0)."""
        found = self._evaluate(lambda model: self.task.score_test(model, self.device))
        if found is None:
            return
        self.test_scores = {**found.metrics, **found.extra}
        self.log.metrics({"split": "test", **self.test_scores})
        self.log.line(f"test (exported model) | {_scores(found.metrics)}")
        for line in found.lines:
            self.log.line(line)

    def _interrupted(self) -> TrainInterrupted:
        """The error for Ctrl-C: the step reached and what ``--resume`` will continue from."""
        found = ckpt.step_checkpoints(self.ckpt_dir)
        if found:
            where = f"--resume continues from {found[-1][1]} (step {found[-1][0]})"
        else:
            where = "no checkpoint was written yet, so a new run starts from step 0"
        return TrainInterrupted(f"interrupted at step {self.step}; {where}")

    # -- the loop ----------------------------------------------------------------------------------------

    def _start_line(self) -> str:
        b = self.budget
        n_params = sum(p.numel() for p in self.model.parameters())
        kind = getattr(self.model, "model_type", type(self.model).__name__)
        until = f"steps {self.step} → {b.max_steps}" if b.max_steps is not None else f"from step {self.step}"
        others = Budget(max_epochs=b.max_epochs, max_time=b.max_time).describe()
        described = self.task.describe()
        return (
            f"training {kind} ({n_params:,} parameters) on {self.device}"
            f"{f' × {self.ctx.world_size} processes' if self.ctx.distributed else ''}: "
            f"{described + ', ' if described else ''}{until}{f' (or {others})' if others else ''}"
        )

    def run(self) -> TrainResult:
        """Train until a budget or early stopping ends the run, then validate, checkpoint and export."""
        t, o = self.config.training, self.config.output
        main = self.ctx.is_main
        self.started = time.perf_counter()
        self.log.line(self._start_line())
        bar = None
        if main and o.progress_bar:
            from tqdm import tqdm

            # disable=None: only on a terminal, so a redirected log is not filled with carriage returns
            bar = tqdm(
                total=t.max_steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr, disable=None
            )
        stream: Iterator[Any] = iter(self.batches)
        if self.stopped_early:
            self.log.line(f"this run stopped early at step {self.step} (patience ran out); not training further")
        interval = [0.0, 0.0, 0.0]  # loss, nll, tokens since the last log line
        interval_seconds = 0.0
        ended_by = None if self.stopped_early else self._budget_reached()
        try:
            while ended_by is None and not self.stopped_early:
                started = time.perf_counter()
                update = self._update([next(stream) for _ in range(t.accumulate)])
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                interval_seconds += time.perf_counter() - started
                self.step += 1
                interval = [interval[0] + update.loss, interval[1] + update.nll, interval[2] + update.tokens]
                if bar is not None:
                    bar.update(1)
                ended_by = self._budget_reached()
                if self.step % o.log_every == 0 or ended_by:
                    self._log_interval(interval, interval_seconds, update.grad_norm, bar)
                    interval, interval_seconds = [0.0, 0.0, 0.0], 0.0
                if ended_by in ("max_epochs", "max_time"):
                    self.log.line(
                        f"training.{ended_by} reached at step {self.step} (epoch {self.batches.epoch:.2f}, "
                        f"{format_duration(self.seconds())} of training)"
                    )
                if self.step % t.valid_every == 0 or ended_by:
                    self.stopped_early = self._validate_and_track()
                if self.step % o.checkpoint_every == 0 or ended_by or self.stopped_early:
                    self.save_checkpoint()
            if self.last_valid_step != self.step:
                self.stopped_early = self._validate_and_track() or self.stopped_early
            if self.last_checkpoint_step != self.step or not ckpt.step_checkpoints(self.ckpt_dir):
                self.save_checkpoint()
            exported = self._finish() if main else o.export
            if main:
                self._score_test()
        except KeyboardInterrupt:
            # The checkpoints on disk are whole (atomic writes); the update in flight is simply lost.
            raise self._interrupted() from None
        finally:
            if bar is not None:
                bar.close()
            self.log.close()
        barrier(self.ctx)
        return TrainResult(
            step=self.step,
            output_dir=self.out,
            best_metric=self.config.metric,
            best_score=self.best_score,
            best_step=self.best_step,
            stopped_early=self.stopped_early,
            resumed_from=self.resumed_from,
            exported=exported,
            last_validation=self.last_validation,
            test_scores=self.test_scores,
            ended_by="early_stopping" if self.stopped_early else (ended_by or "max_steps"),
        )

    def _log_interval(self, interval: list[float], interval_seconds: float, grad_norm: float | None, bar: Any) -> None:
        """The train.log line of the steps since the last one (summed over ranks)."""
        loss_sum, nll_sum, token_sum = self._sum_over_ranks(interval)
        seconds = self._sum_over_ranks([interval_seconds])[0] / self.ctx.world_size
        per_token = loss_sum / max(token_sum, 1)
        max_steps = self.budget.max_steps
        self.log.line(
            f"step {self.step}{f'/{max_steps}' if max_steps is not None else ''} | "
            f"epoch {self.batches.epoch:.2f} | loss {per_token:.4f} | nll {nll_sum / max(token_sum, 1):.4f} | "
            f"lr {self._lr():.3e} | tokens/s {token_sum / max(seconds, 1e-9):.0f}"
            + (f" | grad_norm {grad_norm:.3f}" if grad_norm is not None else "")
        )
        self.log.scalars("train", {"loss": per_token, "lr": self._lr()}, self.step)
        if bar is not None:
            bar.set_postfix(loss=f"{per_token:.3f}", lr=f"{self._lr():.2e}")


def _scores(metrics: dict[str, float]) -> str:
    """``"loss 1.234 | bleu 35.2"``: metrics for a log line."""
    return " | ".join(f"{name} {value:.4g}" for name, value in metrics.items())


def build_trainer(
    config: Config, ctx: DistContext, *, resume: bool = False, echo: Callable[[str], None] = echo_line
) -> Trainer:
    """The :class:`Trainer` of ``config``: the output directory opened, the task built and prepared, its
    model built under the training seed (the same initial weights whatever data preparation drew)."""
    log = open_run_dir(config, ctx, resume=resume, echo=echo)
    task = config.task_class(config, ctx, log.line)
    seed_everything(config.training.seed)
    task.prepare(resume=resume)
    seed_everything(config.training.seed)
    model = task.build_model()
    return Trainer(config, ctx, task=task, model=model, log=log, resume=resume)


def train(
    config: Config,
    *,
    resume: bool = False,
    ctx: DistContext | None = None,
    echo: Callable[[str], None] = echo_line,
) -> TrainResult:
    """Train as ``config`` says (see the module docstring); under torchrun, one process of several.

    Raises:
        ConfigError, TrainError, DataError: a configuration, resume, data or write problem, with a message
            saying what is wrong.
        TrainInterrupted: Ctrl-C (a :class:`TrainError` saying where ``--resume`` continues).
    """
    if ctx is not None:
        return build_trainer(config, ctx, resume=resume, echo=echo).run()
    with distributed_session(config.training.device) as own:
        return build_trainer(config, own, resume=resume, echo=echo).run()


__all__ = [
    "ConfigError",
    "TrainError",
    "TrainInterrupted",
    "TrainResult",
    "Trainer",
    "Update",
    "build_trainer",
    "export_model",
    "train",
]
