"""An evaluation protocol's recipe is fitted to the job (eval/fit.py): keys the command line did not set shrink to
the data, the ranks and the CPUs, each change said; a key given on the command line is never changed."""

from __future__ import annotations

import pytest

from largessl.config.load import config_from_tree, find_recipe
from largessl.config.loader import read_yaml
from largessl.config.schema import PretrainConfig
from largessl.cpus import cpus_per_rank
from largessl.errors import ConfigError
from largessl.eval.fit import fit

IN1K = 1281167


def protocol(recipe: str, overrides: list[str] | None = None) -> PretrainConfig:
    tree = read_yaml(find_recipe(recipe, kind="eval"))
    tree["objective"].update(checkpoint="runs/pretrained", num_classes=10)
    tree["model"] = {"name": "vit_tiny_patch16", "image_size": 112}
    return config_from_tree(tree, overrides or [], default_name="probe")


def test_the_linear_probe_fits_the_demo_set_on_one_process_and_says_each_change() -> None:
    fitted, said = fit(protocol("eval/linear"), 500, 1, [])
    assert (fitted.optim.global_batch_size, fitted.data.micro_batch_size) == (256, 256)
    assert fitted.accumulation_steps(1) == 1  # ZeRO-0 in bf16: no accumulation
    assert fitted.data.num_workers == max(1, min(10, cpus_per_rank() - 1, 500 // 256))
    assert said[0] == ("fitted to this job: optim.global_batch_size 16384 -> 256 (--train has 500 samples; the peak "
                       "lr follows by the linear rule; set optim.global_batch_size to choose)")
    assert said[1].startswith("fitted to this job: data.micro_batch_size 512 -> 256 (the global batch over 1 rank(s), "
                              "without accumulation at ZeRO-0 in bf16")
    assert all(line.startswith("fitted to this job: ") for line in said)


def test_at_the_papers_scale_only_what_cannot_work_changes() -> None:
    linear, _ = fit(protocol("eval/linear"), IN1K, 8, [])  # the recipe: micro-batch 16,384 / GPUs at ZeRO-0
    assert (linear.optim.global_batch_size, linear.data.micro_batch_size) == (16384, 2048)
    attentive, said = fit(protocol("eval/attentive"), IN1K, 8, [])  # ZeRO-1 accumulates: the batches stand
    assert (attentive.optim.global_batch_size, attentive.data.micro_batch_size) == (8192, 256)
    assert all(line.startswith("fitted to this job: data.num_workers") for line in said)


def test_a_key_given_on_the_command_line_is_never_changed() -> None:
    given = ["optim.global_batch_size=16384", "data.num_workers=10"]
    fitted, said = fit(protocol("eval/attentive", given), 500, 1, given)
    assert (fitted.optim.global_batch_size, fitted.data.num_workers) == (16384, 10)
    assert said == []
    given = ["data.micro_batch_size=64"]  # at ZeRO-0 in bf16 this cannot accumulate: refused, naming the key
    fitted, _ = fit(protocol("eval/linear", given), 500, 1, given)
    with pytest.raises(ConfigError, match="distributed.zero_stage: 0 cannot accumulate bf16 gradients"):
        fitted.accumulation_steps(1)


def test_readers_are_no_more_than_can_each_fill_a_batch() -> None:
    fitted, _ = fit(protocol("eval/finetune_vitb16"), 5000, 2, [])  # 5000 // (2 ranks x 64) = 39 readers' worth
    assert fitted.data.num_workers == max(1, min(10, cpus_per_rank() - 1))
    fitted, _ = fit(protocol("eval/finetune_vitb16"), 200, 1, [])  # 128 per rank: one reader of 64 x ... fills
    assert fitted.optim.global_batch_size == 128 and fitted.data.num_workers <= 200 // 64
