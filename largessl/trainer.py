"""When things happen: build the run, resume it, step, log, evaluate, checkpoint, stop on a signal.

Model and objective code is single-device PyTorch; DeepSpeed lives behind `distributed.engine`.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch

from largessl import checkpoint, checkpointing, endings, epochs, rng, watchdog
from largessl.config.load import dump_config
from largessl.config.loader import to_dict
from largessl.config.schema import PretrainConfig
from largessl.data.build import build_train_loader, describe_plan, plan_training
from largessl.data.gpu_decode import covered_rows, to_device
from largessl.data.index import open_split
from largessl.data.loader import DataPosition, kill_workers
from largessl.distributed import comm
from largessl.distributed.ema import EMATeacher
from largessl.distributed.engine import Engine, deepspeed_config, init_distributed, model_init_context
from largessl.errors import SharedError, UserError
from largessl.eval.in_training import InTrainingEval
from largessl.health import FiniteGuard, decode_first_bad, diverged
from largessl.lifecycle import STOP_CHECK_EVERY, STOPS, SaveClock, Stopped, signal_name
from largessl.mfu import Speed
from largessl.models.vit import compile_blocks
from largessl.objectives import objective_class
from largessl.optim.build import make_optimizer
from largessl.optim.param_groups import build_param_groups
from largessl.optim.schedules import apply_schedules
from largessl.progress import Interval, peak_memory_gb, progress_line, say, sync
from largessl.run_dir import RunDir
from largessl.stopping import closing, hand_over, start_watchdog, stop_point
from largessl.tracking import NullTracker, browse_hint, check_store
from largessl.tracking.training import start_training_run
from largessl.tracking.usage import Usage
from largessl.weight_import import encoder_freeze, load_initial


class Trainer:
    """One training job. Whatever ends it (the last step, a signal, an error in any part), `close` runs: DataLoader
    workers killed, MLflow told, the run lock released, and after an error the process group aborted."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.started = time.time()
        self.cfg = cfg
        self.run = RunDir(cfg.run.output_dir, cfg.run.name)
        self.run_dir, self.ckpt_dir = self.run.path, self.run.ckpt_dir
        self.env = init_distributed(cfg.distributed)
        start_watchdog(cfg.distributed.timeout_s, self.env)
        self.note(f"process group up: {self.env.world_size} rank(s) on {self.env.device.type}")
        self.tracker: NullTracker = NullTracker()
        self.usage: Usage | None = None  # rank 0's, once it holds the run directory
        self.closed = False
        self.step = 0
        self.resumes = 0
        self.save_clock = SaveClock(cfg.trainer.ckpt_every_minutes)
        self.device_stage: Any = None  # data.decode=gpu: decodes and augments each batch on the device
        try:
            self._build()
        except Stopped as stop:  # a stop signal during start-up: nothing new to save
            hand_over(stop.signum, self.env.is_main, "it resumes where this job started")
            self.close("KILLED")
            raise
        except BaseException:
            self.close("FAILED")
            raise

    def _build(self) -> None:
        cfg = self.cfg
        self.accumulation = cfg.accumulation_steps(self.env.world_size)
        self.config_text = dump_config(cfg)
        stop_point(self.env, "run directory", self.note)
        self._take_run_dir()
        self.train_index = open_split(cfg.data.train, cfg.data.train_split, "data.train")
        self.cfg, resolved = epochs.resolve(cfg, self.train_index.num_samples)
        cfg = self.cfg
        if resolved:
            self.note(f"schedule in epochs: {'; '.join(resolved)}")
        self.plan = plan_training(cfg.data, self.train_index, seed=cfg.trainer.seed, world_size=self.env.world_size,
                                  global_batch=cfg.optim.global_batch_size)
        self.ds_config = deepspeed_config(cfg.distributed, micro_batch=cfg.data.micro_batch_size,
                                          accumulation=self.accumulation, world_size=self.env.world_size,
                                          grad_clip=cfg.optim.grad_clip)
        self.objective_cls = objective_class(cfg.objective.name)
        # data.decode=gpu without a GPU path is said here, before the build
        self.worker_transform, self.device_stage = self.objective_cls.input_transforms(cfg.objective, cfg.model,
                                                                                       cfg.data.decode)
        self.note(f"building {cfg.objective.name} on {cfg.model.name}"
                  + (f", partitioned over {self.env.world_size} rank(s) (ZeRO-3)" if self.zero_stage == 3 else ""))
        stop_point(self.env, "building the model", self.note)
        rng.seed_everything(cfg.trainer.seed)  # identical initial weights on every rank
        with model_init_context(self.ds_config):
            objective = self.objective_cls(cfg.objective, cfg.model)
        self.speed = Speed(objective, self.env.device, self.env.world_size, cfg.distributed.peak_tflops)
        if cfg.model.compile:
            self.note(f"model.compile: {compile_blocks(objective)} transformer blocks compiled on first use")
        for line in load_initial(objective, cfg, resuming=bool(checkpoint.newest_complete(self.ckpt_dir))):
            self.note(line)  # an evaluation's pretrained encoder, or model.init_from
        self.engine = Engine(objective, build_param_groups(objective, cfg.optim, encoder_freeze(objective, cfg.model)),
                             self.ds_config, betas=cfg.optim.betas, eps=cfg.optim.eps, device=self.env.device,
                             make_optimizer=partial(make_optimizer, cfg=cfg.optim))
        self.note(self.engine.describe(cfg, self.accumulation, self.env.world_size))
        self.teacher = EMATeacher.of(self.engine)
        if self.teacher:
            self.note(self.teacher.describe())
        self.evals = InTrainingEval(cfg, self.engine.module, self.env, self.tracker_log, self.note)
        self.guard = FiniteGuard(self.env.device, grad_overflow_is_skipped=cfg.distributed.precision == "fp16")
        self._resume_and_start()

    def _resume_and_start(self) -> None:
        rng.seed_everything(self.cfg.trainer.seed + 1 + self.env.rank)  # independent drop-path etc. per rank
        stop_point(self.env, "resuming", self.note)
        client_state = self._load_checkpoint()  # before the run directory takes this config
        self._record_config()
        self.position = self._restore(client_state)
        self.note(describe_plan(self.plan, self.train_index))
        stop_point(self.env, "starting the data loader", self.note)
        self.batches = self._start_loader()  # workers fork before the tracker starts its thread
        self.tracker = self._start_tracking(client_state)
        stop_point(self.env, "first step", self.note, last=True)
        self.note(f"training from step {self.step} to {self.cfg.trainer.max_steps}: "
                  + self.speed.plan(self.cfg, self.step, self.train_index.num_samples))

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config["zero_optimization"]["stage"])

    def note(self, message: str) -> None:
        """A line on stdout from rank 0 (the other ranks would print the same)."""
        if self.env.is_main:
            say(message)

    def _start_loader(self) -> Any:
        cfg = self.cfg
        loader = build_train_loader(
            cfg.data, self.plan, self.worker_transform,
            rank=self.env.rank, world_size=self.env.world_size, states=self.position.readers,
            rotation=self.position.micro_batches % max(1, cfg.data.num_workers),
            corrupt_log_path=str(self.run_dir / "corrupt_samples.jsonl"))
        torch_rng = torch.get_rng_state()
        batches = iter(loader)  # draws a worker base seed from torch's RNG (unused: samples are seeded)
        torch.set_rng_state(torch_rng)  # so drop path continues a resumed run's random stream exactly
        return batches

    def close(self, status: str) -> None:
        """Release everything the job holds; idempotent. `status` is MLflow's: FINISHED, KILLED or FAILED."""
        if self.closed:
            return
        self.closed = True
        closing()
        kill_workers()
        if self.usage and self.step:  # the time since the last progress line (a checkpoint, say) counts too
            self.tracker.log_metrics(self.usage.logged(), self.step)
        self.tracker.finish(status)
        self.run.unlock()
        if status == "FAILED":
            comm.abort()

    # ----------------------------------------------------------------- set-up and resume

    def _take_run_dir(self) -> None:
        """Rank 0 creates, checks and locks the run directory (and checks the MLflow store); every rank learns
        the outcome, so a refusal ends all of them with rank 0's line."""
        problem = ""
        if self.env.is_main:
            try:
                self.run.create()
                check_store(self.cfg.tracking, self.run_dir)
                problem = self.run.lock_as_main()
            except UserError as exc:
                problem = str(exc)
        problem = comm.broadcast_object(problem)
        if problem:
            raise SharedError(problem)
        if not self.env.is_main:
            self.run.lock_as_rank(self.env.rank)
        endings.keep_in(self.run_dir, self.env.rank)  # each rank's last line, there too

    def _record_config(self) -> None:
        if self.env.is_main:
            changed = self.run.record_config(self.config_text, to_dict(self.cfg), self.ds_config)
            if changed:
                say(f"warning: the config differs from this run's previous one in: {', '.join(changed)}; "
                    "MLflow keeps the params it logged first")
        comm.barrier()

    def _load_checkpoint(self) -> dict[str, Any] | None:
        choice = checkpointing.choose(self.run, self.env.is_main)
        if choice.tag is None:
            self.note(f"no checkpoint in {self.ckpt_dir}: a new run")
            if self.teacher:
                self.teacher.initialize()  # teacher = student
            return None
        checkpointing.check_layout(self.run, choice.tag, self.cfg.distributed.zero_stage)
        client_state = checkpointing.load(self.engine, self.teacher, self.ckpt_dir, choice.tag)
        if self.env.is_main:
            checkpointing.set_aside_damaged(self.run, choice)
        self.note(f"resumed from {self.ckpt_dir / choice.tag} (step {client_state['step']})")
        return client_state

    def _restore(self, client_state: dict[str, Any] | None) -> DataPosition:
        """Step, RNG and data position of this rank; approximate when the world size or workers changed."""
        if client_state is None:
            return DataPosition()
        self.step = int(client_state["step"])
        self.resumes = int(client_state.get("resumes", 0)) + 1
        position, change = checkpointing.resumed_position(
            client_state, self.plan, rank=self.env.rank, world_size=self.env.world_size,
            num_workers=self.cfg.data.num_workers, micro_batch_size=self.cfg.data.micro_batch_size,
            accumulation=self.accumulation)
        if change:
            self.note(change)
        return position

    def _start_tracking(self, client_state: dict[str, Any] | None) -> NullTracker:
        if not self.env.is_main:
            return NullTracker()
        self.usage = Usage(self.run_dir, self.env.world_size, self.started, self.env.device.type)
        return start_training_run(self.cfg, self.run_dir, world_size=self.env.world_size,
                                  accumulation=self.accumulation, step=self.step, resumes=self.resumes,
                                  run_tags=self.engine.module.run_tags(), client_state=client_state)

    # ----------------------------------------------------------------- the loop

    def train(self) -> int:
        """Train to trainer.max_steps; returns the exit code (128 + signal number when stopped by a signal).
        Any exception ends the job cleanly (see `close`) and propagates."""
        status = "FAILED"
        try:
            code = self._loop()
            status = "KILLED" if code else "FINISHED"
            return code
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.close(status)

    def _loop(self) -> int:
        cfg = self.cfg.trainer
        batches = self.batches
        interval, first_step = Interval(), self.step + 1
        while self.step < cfg.max_steps:
            report = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.max_steps
            terms, lr, wd, grad_norm = self.train_step(batches, want_norm=report)
            self.step += 1
            interval.add(terms)
            if self.step == first_step and not report:
                self.note(f"step {self.step}: {interval.step_time():.1f} s (the wait for the first batches included)")
            saving = self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps
            if report:
                self._report(interval, lr, wd, grad_norm)
                interval.reset()
            stopping, timed = self._check(report or saving)
            saving = saving or timed
            if self.evals.due(self.step):
                watchdog.mark("evaluation")
                with interval.paused():
                    self.evals.run(self.step)
            if stopping or saving:
                with interval.paused():
                    self.save()
            if stopping:
                self.note(f"stopped by {signal_name(stopping)} at step {self.step}; checkpoint saved in "
                          f"{self.ckpt_dir}; rerun the same command to resume")
                hand_over(stopping, self.env.is_main, "it resumes from the checkpoint just saved")
                return 128 + stopping
        self.evals.finish(self.step)
        self._say_done()
        return 0

    def train_step(self, batches: Any, want_norm: bool) -> tuple[dict[str, torch.Tensor], float, float, float | None]:
        """One optimizer step over `accumulation` micro-batches; returns the mean of the objective's outputs."""
        module = self.engine.module
        lr, wd = apply_schedules(self.engine.param_groups, self.step, self.cfg.optim, self.cfg.trainer.max_steps)
        self._unfreeze_groups()
        module.begin_step(self.step, self.cfg.trainer.max_steps)
        terms: dict[str, torch.Tensor] = {}
        grad_norm = None
        for _ in range(self.accumulation):
            watchdog.mark("reading data", self.step + 1)
            batch = self.position.observe(next(batches))
            batch = to_device(batch, self.env.device, self.device_stage)
            watchdog.mark("forward/backward")
            out = self.engine(batch)
            self.engine.backward(out["loss"])
            watchdog.mark("optimizer step")
            grad_norm = self.engine.step(want_norm)
            for key, value in out.items():
                terms[key] = terms.get(key, 0.0) + value.detach().float() / self.accumulation
        self.guard.observe(self.step + 1, terms["loss"], self.engine.last_grad_norm())
        module.after_optimizer_step(self.step + 1)
        if self.teacher:
            watchdog.mark("EMA update")
            self.teacher.update(module.teacher_momentum())
        return terms, lr, wd, grad_norm

    def _unfreeze_groups(self) -> None:
        """When a group's freeze ends, reset its AdamW state: the official code never stepped it before."""
        for index, group in enumerate(self.engine.param_groups):
            if group.get("frozen_steps", 0) and self.step == group["frozen_steps"]:
                self.engine.reset_optimizer_state(index)
                self.note(f"step {self.step}: parameter group {group['name']} starts training")

    def _report(self, interval: Interval, lr: float, wd: float, grad_norm: float | None) -> None:
        watchdog.mark("progress report")
        sync(self.env.device)
        terms = interval.mean_terms()
        keys = sorted(terms, key=lambda k: (k != "loss", k))
        corrupt = torch.tensor(float(self.position.corrupt + covered_rows(self.device_stage)), device=self.env.device)
        means = comm.all_reduce_mean(torch.stack([*(terms[k] for k in keys), corrupt])).tolist()  # one collective
        step_time = interval.step_time()
        metrics = {k: float(v) for k, v in zip(keys, means[:-1], strict=True)}
        metrics.update({
            "lr": lr, "weight_decay": wd, "loss_scale": self.engine.loss_scale(),
            "images_per_sec": self.cfg.optim.global_batch_size / step_time, "step_time": step_time,
            "peak_mem_gb": peak_memory_gb(self.env.device), "epoch": self.epoch(),
            "data/corrupt_images": means[-1] * self.env.world_size,
            **self.speed.metrics(self.cfg.optim.global_batch_size / step_time),
        })
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        if self.usage:
            metrics.update(self.usage.logged())
        self.note(progress_line(self.step, self.cfg.trainer.max_steps, metrics, keys))
        self.tracker_log(metrics, self.step)

    def tracker_log(self, metrics: dict[str, float], step: int) -> None:
        """To RUN_DIR/metrics.jsonl and MLflow (rank 0's tracker; the other ranks' does nothing)."""
        self.tracker.log_metrics(metrics, step)

    def epoch(self) -> float:
        return self.step * self.cfg.optim.global_batch_size / self.plan.epoch_samples

    # ----------------------------------------------------------------- checkpoints, signals

    def client_state(self) -> dict[str, Any]:
        return {
            "step": self.step, "samples_seen": self.step * self.cfg.optim.global_batch_size, "epoch": self.epoch(),
            "world_size": self.env.world_size, "num_workers": self.cfg.data.num_workers,
            "micro_batch_size": self.cfg.data.micro_batch_size,
            "data": comm.all_gather_object(self.position.state_dict()),
            "rng": comm.all_gather_object(rng.capture_rng()),
            "resumes": self.resumes,
            "mlflow_run_id": self.tracker.run_id,
            "tracking_uri": self.tracker.uri,
            "objective": self.engine.module.extra_state(),
        }

    def save(self) -> None:
        """A checkpoint of this step, on every rank (checkpointing.save: refused when the weights are not finite;
        complete, and named by `latest`, only once every rank has written its part)."""
        watchdog.mark("checkpoint write")
        checkpointing.save(self.engine, self.teacher, self.run, self.step, self.client_state,
                           layout={"zero_stage": self.cfg.distributed.zero_stage, "world_size": self.env.world_size,
                                   "precision": self.cfg.distributed.precision},
                           keep_last=self.cfg.trainer.keep_last, is_main=self.env.is_main)
        self.save_clock.restart()

    def _check(self, due: bool) -> tuple[int, bool]:
        """(the stop signal any rank got, 0 for none; save for trainer.ckpt_every_minutes); raises when any rank's
        loss or gradient norm went non-finite. All ranks ask at the same steps: one small collective (a device
        sync), so only every STOP_CHECK_EVERY steps, at reports and before checkpoints: a preempted or diverged job
        stops within that many steps. Rank 0's clock decides the timed saves, so every rank saves at the same step."""
        if not due and self.step % STOP_CHECK_EVERY:
            return 0, False
        watchdog.mark("stop check")
        timed = self.env.is_main and self.save_clock.due()
        stop, bad, save = comm.all_reduce_max(torch.stack([
            torch.tensor(float(STOPS.received), dtype=torch.float64, device=self.env.device),
            self.guard.encoded(), torch.tensor(float(timed), dtype=torch.float64, device=self.env.device)]))
        first_bad = decode_first_bad(bad)
        if first_bad is not None:
            raise diverged(first_bad, checkpoint.newest_complete(self.ckpt_dir))
        return int(stop), bool(save > 0)

    def _say_done(self) -> None:
        endings.keep(f"done: {self.step} steps")
        if not self.env.is_main:
            return
        say(f"done: {self.step} steps; run directory {self.run_dir}")
        if self.tracker.run_id:
            say(browse_hint(self.tracker.uri, self.tracker.run_id))


def train(cfg: PretrainConfig) -> tuple[int, Trainer | None]:
    """Build and train (`largessl pretrain`, `largessl eval PROTOCOL`); (exit code, the trainer), the trainer None
    when a stop signal came during start-up (the code is then 128 + the signal, as for a stop while training)."""
    try:
        trainer = Trainer(cfg)
    except Stopped as stop:
        return stop.code, None
    return trainer.train(), trainer
