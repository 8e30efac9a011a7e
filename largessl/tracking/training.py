"""The MLflow run of a pretraining job (rank 0): its params and tags, the config files, and a resume's marks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from largessl.config.loader import flatten, to_dict
from largessl.config.schema import PretrainConfig
from largessl.launch import slurm
from largessl.tracking import Tracker, git_commit


def start_training_run(cfg: PretrainConfig, run_dir: Path, *, world_size: int, accumulation: int, step: int,
                       resumes: int, run_tags: dict[str, str], client_state: dict[str, Any] | None) -> Tracker:
    """The tracker of a job that trains from `step` (0: a new run), continuing the run's MLflow run when it has one
    (the checkpoint's `client_state` names it for run directories from before mlflow_run.json). Params are the
    whole config; what a later job may change and a comparison needs is a tag (world size, max_steps, restarts)."""
    tags = {"method": cfg.objective.name, "model": cfg.model.name, "world_size": str(world_size),
            "git_commit": git_commit(), "slurm_job_id": slurm.job_id(),
            "slurm_restart_count": str(slurm.restart_count()), "resumes": str(resumes),
            "run_dir": str(run_dir.resolve()), "max_steps": str(cfg.trainer.max_steps), **run_tags}
    params = {**flatten(to_dict(cfg)), "derived.world_size": world_size, "derived.accumulation_steps": accumulation,
              "derived.peak_lr": cfg.optim.peak_lr()}
    client_state = client_state or {}
    tracker = Tracker.start(cfg.tracking, run_dir=run_dir, run_name=cfg.run.name, params=params, tags=tags,
                            resume_step=step, fallback_run_id=client_state.get("mlflow_run_id", ""),
                            fallback_uri=client_state.get("tracking_uri", ""))
    for name in ("config.yaml", "ds_config.json"):  # re-logged on resume: the config may have changed
        tracker.log_artifact(run_dir / name)
    if resumes:  # the run's history shows every restart at the step it resumed from
        tracker.log_metrics({"resumes": resumes, "slurm_restart_count": slurm.restart_count()}, step)
    return tracker
