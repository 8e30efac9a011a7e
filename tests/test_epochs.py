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


def test_a_recipe_in_epochs_is_right_on_any_dataset() -> None:
    cfg = load_config("pretrain/cae_vith14")
    assert cfg.trainer.epochs == 1600 and cfg.optim.warmup_epochs == 40
    in1k, _ = resolve(cfg, 1_281_167)
    in22k, _ = resolve(cfg, 14_197_122)
    assert (in1k.trainer.max_steps, in1k.optim.warmup_steps) == (1_000_000, 25_000)  # 625 steps per epoch at 2048
    assert (in22k.trainer.max_steps, in22k.optim.warmup_steps) == (1600 * 6932, 40 * 6932)


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
    with pytest.raises(ConfigError, match="larger than the training split"):
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
