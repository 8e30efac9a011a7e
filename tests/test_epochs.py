"""Schedules in epochs (resolved from dataset.json counts and the global batch) and time-based checkpoints."""

from __future__ import annotations

import pytest

from largessl.config.load import dump_config, load_config
from largessl.epochs import resolve
from largessl.errors import ConfigError
from largessl.lifecycle import SaveClock

DINO = "debug/dino_vit_tiny"


def test_epochs_resolve_to_floor_of_samples_over_global_batch() -> None:
    cfg = load_config(DINO, ["trainer.epochs=3", "optim.warmup_epochs=0.5", "optim.global_batch_size=64",
                             "objective.warmup_teacher_temp_epochs=1", "objective.freeze_last_layer_epochs=2"])
    assert cfg.trainer.max_steps is None and cfg.optim.warmup_steps is None
    resolved, said = resolve(cfg, num_samples=9469)  # 147 steps per epoch (9469 // 64), the last 61 samples dropped
    assert resolved.trainer.max_steps == 441 and resolved.optim.warmup_steps == 74  # round(73.5), half to even
    assert resolved.objective.warmup_teacher_temp_steps == 147 and resolved.objective.freeze_last_layer_steps == 294
    assert said[0].startswith("147 steps per epoch")
    assert cfg.trainer.max_steps is None  # the user's config is left as written (config.yaml records epochs)
    assert "epochs: 3.0" in dump_config(cfg) and "max_steps: null" in dump_config(cfg)


def test_a_shipped_recipe_plans_the_same_steps_on_any_dataset() -> None:
    """Its epochs are ImageNet-1k's (trainer.epoch_samples): 1600 of them are one million steps at 2048 on
    ImageNet-1k, on ImageNet-22K and on a small dataset alike; `trainer.epoch_samples=null` makes them the given
    dataset's epochs."""
    for recipe in ("pretrain/cae_vith14", "pretrain/mae_vitb16", "pretrain/dino_vits16", "pretrain/sim_vitl16"):
        cfg = load_config(recipe)
        assert cfg.trainer.epoch_samples == 1_281_167, recipe
        plans = {resolve(cfg, samples)[0].trainer.max_steps for samples in (1_281_167, 13_151_276, 9_469)}
        assert plans == {round(cfg.trainer.epochs * (1_281_167 // cfg.optim.global_batch_size))}, recipe
    cfg = load_config("pretrain/cae_vith14")
    in22k, said = resolve(cfg, 13_151_276)
    assert (in22k.trainer.max_steps, in22k.optim.warmup_steps) == (1_000_000, 25_000)  # 625 steps per epoch
    assert said[0] == ("625 steps per epoch (1281167 samples // 2048; an epoch is trainer.epoch_samples, 0.0974 "
                       "passes over data.train's 13151276)")
    own = load_config("pretrain/cae_vith14", ["trainer.epoch_samples=null"])
    assert resolve(own, 13_151_276)[0].trainer.max_steps == 1600 * 6421  # 13,151,276 // 2048
    with pytest.raises(ConfigError, match="trainer.epoch_samples: must be > 0"):
        load_config("pretrain/cae_vith14", ["trainer.epoch_samples=0"])


def test_an_override_of_one_key_replaces_the_recipes_other_key() -> None:
    assert load_config("pretrain/cae_vith14", ["trainer.max_steps=50"]).trainer.epochs is None
    steps = load_config(DINO, ["trainer.epochs=2"])  # the debug recipe is in steps
    assert steps.trainer.max_steps is None and steps.trainer.epochs == 2


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.epochs=2", "trainer.max_steps=5"], "both set in the overrides"),
    (["trainer.max_steps=null"], "set exactly one of trainer.max_steps and trainer.epochs"),
    (["trainer.epochs=0"], "trainer.epochs: must be > 0"),
    (["optim.warmup_epochs=-1"], "optim.warmup_epochs: must be >= 0"),
])
def test_bad_pairs_are_one_clear_error(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(DINO, overrides)


def test_an_epoch_without_a_step_is_refused() -> None:
    cfg = load_config(DINO, ["trainer.epochs=1", "optim.global_batch_size=1024", "data.micro_batch_size=64"])
    with pytest.raises(ConfigError, match=r"1024 is larger than an epoch \(500 samples\)"):
        resolve(cfg, 500)


def test_save_clock_is_due_after_its_period_and_restarts_at_each_checkpoint() -> None:
    now = [100.0]
    clock = SaveClock(2.0, clock=lambda: now[0])
    assert not clock.due()
    now[0] += 119.0
    assert not clock.due()
    now[0] += 1.0
    assert clock.due()
    clock.restart()
    assert not clock.due()
    assert not SaveClock(0.0, clock=lambda: now[0] + 1e9).due()  # 0 disables it


def test_the_start_up_says_the_images_passes_flops_and_least_device_hours_left() -> None:
    """Speed.plan, with the real FLOP model of the debug MAE: the images left from step 10, as passes over the
    split, the FLOPs, and with a peak (989 TFLOP/s given) the device-hours at 100% of it: a bound."""
    import torch

    from largessl.mfu import Speed
    from largessl.objectives import objective_class

    cfg = load_config("debug/mae_vit_tiny", ["trainer.max_steps=110", "optim.global_batch_size=64",
                                             "data.micro_batch_size=16"])
    objective = objective_class("mae")(cfg.objective, cfg.model)
    per_image = objective.flops_per_image().train_step
    line = Speed(objective, torch.device("cpu"), 4, 989.0).plan(cfg, 10, 1000)
    hours = per_image * 6400 / 989e12 / 3600
    assert line.startswith(f"6,400 images, 6.4 passes over data.train's 1,000 samples; {per_image * 6400:.3g} FLOPs, "
                           f"at least {hours:,.1f} device-hours at the 989 TFLOP/s peak ({hours / 4:,.1f} h on 4 "
                           "devices); a progress line (with the ETA) every"), line
    unknown = Speed(objective, torch.device("cpu"), 1, 0.0).plan(cfg, 10, 1000)
    assert "device-hours" not in unknown and "FLOPs" in unknown  # no peak on a CPU: no time is claimed
