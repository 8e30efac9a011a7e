"""Starting from public weights (largessl/weight_import.py, `model.init_from`): files built here as their makers
write them (no download is possible): timm models with random weights saved by safetensors and torch.save;
transformers' ViTModel, ViTMAEModel and Dinov2Model saved by save_pretrained (and renamed as transformers 4 saved
them); MAE's and DINO's checkpoint layouts written by the helpers below, which follow those repositories' key names
(MAE: models_mae.py's MaskedAutoencoderViT saved as {"model": ..., "args": ...}; DINO: main_dino.py's save_dict
{"student": DDP state, "teacher": ..., "dino_loss": ..., "args": ...}). Every case checks what was loaded against
the file, and the features of the encoder against the file's model.
"""

from __future__ import annotations

import argparse
import pickle
import re
import time
from pathlib import Path

import pytest
import timm
import torch
import transformers
from conftest import run_largessl
from safetensors.torch import save_file

from largessl.config.load import load_config
from largessl.errors import ConfigError
from largessl.models.timm_format import timm_state_dict
from largessl.objectives import objective_class
from largessl.weight_import import import_file, load_initial

IMAGES = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))


def objective_for(recipe: str, seed: int = 1) -> tuple[torch.nn.Module, object]:
    """The debug recipe's objective with random weights of `seed`, every tensor moved off its initial value (zero
    biases, unit norms), so two seeds differ everywhere."""
    cfg = load_config(f"debug/{recipe}", [])
    torch.manual_seed(seed)
    objective = objective_class(cfg.objective.name)(cfg.objective, cfg.model)
    with torch.no_grad():
        for param in objective.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return objective, cfg


def timm_vit(image_size: int = 96, **kwargs: object) -> torch.nn.Module:
    """A ViT-Tiny/16 of timm with random weights (learned positions), eval mode."""
    torch.manual_seed(2)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=image_size, num_classes=10, **kwargs)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))  # no zero biases or cls: every tensor tells
    return model.eval()


def features(encoder: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return encoder.eval()(IMAGES)


def test_a_timm_safetensors_file_starts_dinos_student_with_timms_features(tmp_path: Path) -> None:
    model = timm_vit()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "vit.safetensors")
    objective, cfg = objective_for("dino_vit_tiny")
    imported = import_file(tmp_path / "vit.safetensors", objective, cfg)
    assert imported.form == "safetensors under timm's names"
    assert sorted(imported.ignored) == ["head.bias", "head.weight"]
    assert len(imported.weights) == len(list(objective.trained_encoder().parameters())) and not imported.notes
    lines = load_initial_into(objective, cfg, tmp_path / "vit.safetensors")
    assert lines[0].startswith(f"model.init_from: {tmp_path / 'vit.safetensors'} (safetensors under timm's names): "
                               "150 tensors loaded")
    assert "student.head" in lines[1] and "ignored (nothing here uses them): head" in lines[2]
    with torch.no_grad():
        theirs = model.forward_features(IMAGES)
    assert torch.allclose(features(objective.trained_encoder()), theirs, atol=1e-5)


def load_initial_into(objective: torch.nn.Module, cfg: object, path: Path) -> list[str]:
    cfg.model.init_from = str(path)
    return load_initial(objective, cfg, resuming=False)


def test_learned_positions_are_resampled_to_this_grid(tmp_path: Path) -> None:
    model = timm_vit(image_size=64)  # 4x4 patches; the run's are 6x6
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "vit.safetensors")
    objective, cfg = objective_for("dino_vit_tiny")
    imported = import_file(tmp_path / "vit.safetensors", objective, cfg)
    assert imported.notes == ["positions resampled from 4x4 to 6x6 patches (bicubic)"]
    resampled = timm.layers.resample_abs_pos_embed(model.pos_embed.detach(), new_size=[6, 6], old_size=[4, 4],
                                                   num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    assert torch.equal(imported.weights["student.backbone.pos_embed"], resampled)


def mae_official(objective: torch.nn.Module, full: bool) -> dict[str, object]:
    """An MAE checkpoint as MAE's main_pretrain.py saves it: {"model": MaskedAutoencoderViT's state dict, "args"}.
    Its names: the encoder's are timm's; the decoder's are mask_token, decoder_embed, decoder_pos_embed (a fixed
    table), decoder_blocks.i (timm's block names), decoder_norm, decoder_pred. The released `mae_pretrain_*.pth`
    holds the encoder only."""
    state = timm_state_dict(objective.trained_encoder())
    if full:
        decoder = objective.decoder
        state["mask_token"] = decoder.mask_token.detach().clone()
        state["decoder_pos_embed"] = decoder.pos_embed.detach().clone()
        for key, value in decoder.state_dict().items():
            if key not in ("mask_token", "pos_embed"):
                state[f"decoder_{key}"] = value.detach().clone()
    return {"model": state, "optimizer": {}, "epoch": 799, "args": argparse.Namespace(model="mae_vit_tiny")}


@pytest.mark.parametrize("full", [False, True])
def test_maes_checkpoints_load_with_their_decoder_when_they_have_one(tmp_path: Path, full: bool) -> None:
    source, cfg = objective_for("mae_vit_tiny")
    torch.save(mae_official(source, full), tmp_path / "mae.pth")
    target, _ = objective_for("mae_vit_tiny", seed=9)
    lines = load_initial_into(target, cfg, tmp_path / "mae.pth")
    loaded = {name for name, p in target.named_parameters() if torch.equal(p, dict(source.named_parameters())[name])}
    decoder = {name for name, _ in target.named_parameters() if name.startswith("decoder.")}
    encoder = {name for name, _ in target.named_parameters() if name.startswith("encoder.")}
    assert loaded == (encoder | decoder if full else encoder)
    form = "MAE checkpoint with its decoder" if full else "checkpoint, its 'model' under timm's names"
    assert lines[0].startswith(f"model.init_from: {tmp_path / 'mae.pth'} ({form}): ")
    assert ("starts fresh (the file has none): decoder" in " ".join(lines)) is not full


def dino_official(objective: torch.nn.Module, seed: int = 6) -> dict[str, object]:
    """DINO's full checkpoint: the student under DDP ("module.backbone.", "module.head."), the teacher bare
    ("backbone.", "head."), the loss's center, and args; its head's last layer keeps weight_g (1 with the default
    norm_last_layer)."""
    torch.manual_seed(seed)
    student = {f"module.backbone.{k}": v for k, v in timm_state_dict(objective.student.backbone).items()}
    head = {k: v.detach().clone() for k, v in objective.student.head.state_dict().items()}
    head.setdefault("last_layer.weight_g", torch.ones(head["last_layer.weight_v"].shape[0], 1))
    student.update({f"module.head.{k}": v for k, v in head.items()})
    teacher = {key.removeprefix("module."): value + 0.01 * torch.randn_like(value) for key, value in student.items()
               if "pos_embed" not in key and "weight_g" not in key}  # a teacher apart from its student
    teacher["backbone.pos_embed"] = student["module.backbone.pos_embed"] + 0.01
    teacher["head.last_layer.weight_g"] = student["module.head.last_layer.weight_g"]
    return {"student": student, "teacher": teacher, "optimizer": {}, "epoch": 100,
            "dino_loss": {"center": torch.zeros(1, 8)}, "args": argparse.Namespace(arch="vit_tiny")}


def test_dinos_full_checkpoint_starts_the_student_backbone_and_head(tmp_path: Path) -> None:
    source, cfg = objective_for("dino_vit_tiny")
    torch.save(dino_official(source), tmp_path / "checkpoint.pth")
    target, _ = objective_for("dino_vit_tiny", seed=9)
    lines = load_initial_into(target, cfg, tmp_path / "checkpoint.pth")
    ours = dict(source.named_parameters())
    student = [name for name, _ in target.named_parameters() if name.startswith("student.")]
    assert all(torch.equal(dict(target.named_parameters())[name], ours[name]) for name in student)
    assert "the head's last-layer norm is 1, as this run's fixed norm" in lines[0]
    assert lines[-1] == f"model.init_from: the teacher starts from the file's teacher ({len(student)} tensors)"
    assert not any("starts fresh" in line for line in lines), lines
    written = dino_official(source)["teacher"]  # the same draws: seeded below
    assert sorted(target.initial_teacher) == sorted(name for name, _ in target.named_parameters()
                                                    if name.startswith("teacher."))
    assert torch.equal(target.initial_teacher["teacher.backbone.blocks.3.mlp.fc1.weight"],
                       written["backbone.blocks.3.mlp.fc1.weight"])


def test_a_learned_norm_in_dinos_head_is_refused_when_the_run_fixes_it(tmp_path: Path) -> None:
    source, cfg = objective_for("dino_vit_tiny")
    checkpoint = dino_official(source)
    checkpoint["student"]["module.head.last_layer.weight_g"] *= 2
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    with pytest.raises(ConfigError, match="set objective.norm_last_layer=false to load it"):
        import_file(tmp_path / "checkpoint.pth", source, cfg)


def test_cae_drops_the_k_bias_and_keeps_the_features(tmp_path: Path) -> None:
    """A BEiT-style block has no k bias: the file's is dropped, and attention (so every feature) is unchanged."""
    source, cfg = objective_for("cae_vit_tiny")
    state = timm_state_dict(source.trained_encoder())
    for index in range(len(source.trained_encoder().blocks)):
        state[f"blocks.{index}.attn.qkv.bias"][192:384] = torch.randn(192)  # a k bias
    save_file(state, tmp_path / "cae.safetensors")
    target, _ = objective_for("cae_vit_tiny", seed=9)
    imported = import_file(tmp_path / "cae.safetensors", target, cfg)
    assert imported.notes == ["k biases dropped (BEiT-style blocks have none; attention does not change)"]
    load_initial_into(target, cfg, tmp_path / "cae.safetensors")
    assert torch.allclose(features(target.trained_encoder()), features(source.trained_encoder()), atol=1e-5)


def cae_official(objective: torch.nn.Module) -> dict[str, object]:
    """CAE's pretraining checkpoint as its repository (Atten4Vis/CAE, models/modeling_cae.py, furnace/utils.py)
    saves it: {"model", "optimizer", "epoch", "scaler", "args"}; the encoder under `encoder.` with BEiT-style blocks
    (q_bias, v_bias, gamma_1/2: our encoder's own names), its copy `alignment_encoder.`, `mask_token`, the
    regressor's fixed table `rd_pos_embed`, `regresser.regressor_blocks.N.` (norm1_q/k/v, cross_attn, norm2_cross,
    mlp_cross, gamma_1_cross/gamma_2_cross), `regresser.norm`, `decoder.decoder_blocks.N.`, `decoder.norm`,
    `decoder.head`."""
    params = {name: p.detach().clone() for name, p in objective.named_parameters()}
    model = {name: value for name, value in params.items() if name.startswith("encoder.")}
    model["encoder.pos_embed"] = objective.encoder.pos_embed.detach().clone()
    model.update({"alignment_" + name: value.clone() for name, value in model.items()})
    model["mask_token"] = params["regressor.mask_token"]
    model["rd_pos_embed"] = objective.pos_embed.detach().clone()
    cross = {"norm2": "norm2_cross", "mlp": "mlp_cross", "gamma_1": "gamma_1_cross", "gamma_2": "gamma_2_cross"}
    for name, value in params.items():
        if name.startswith("regressor.blocks."):
            index, rest = name.removeprefix("regressor.blocks.").split(".", 1)
            head, _, tail = rest.partition(".")
            model[f"regresser.regressor_blocks.{index}.{cross.get(head, head)}" + (f".{tail}" if tail else "")] = value
        elif name.startswith("regressor.norm."):
            model[name.replace("regressor.", "regresser.")] = value
        elif name.startswith("decoder.blocks."):
            model[name.replace("decoder.blocks.", "decoder.decoder_blocks.")] = value
        elif name.startswith("decoder."):
            model[name] = value
    return {"model": model, "optimizer": {}, "epoch": 1599, "scaler": {}, "args": argparse.Namespace(model="cae")}


def test_caes_checkpoint_loads_encoder_regressor_and_decoder(tmp_path: Path) -> None:
    source, cfg = objective_for("cae_vit_tiny")
    torch.save(cae_official(source), tmp_path / "cae.pth")
    target, _ = objective_for("cae_vit_tiny", seed=9)
    lines = load_initial_into(target, cfg, tmp_path / "cae.pth")
    ours = dict(source.named_parameters())
    assert all(torch.equal(param, ours[name]) for name, param in target.named_parameters())
    assert lines[0].startswith(f"model.init_from: {tmp_path / 'cae.pth'} (CAE checkpoint): "
                               f"{len(ours)} tensors loaded")
    assert lines[1].startswith("model.init_from: ignored (nothing here uses them): alignment_encoder.cls_token, ")
    assert "alignment_encoder.blocks (180 tensors)" in lines[1] and lines[1].endswith(", rd_pos_embed")


def sim_official(objective: torch.nn.Module) -> dict[str, object]:
    """SIM's pretraining checkpoint (OpenGVLab/Siamese-Image-Modeling, models_sim.py, util/misc.py): {"model", ...}
    with the online encoder at the top under timm's names (no final norm; pos_embed a fixed table), its projector
    (decoder_embed, projector_decoder_blocks.N with batch norms: norm1.bn.*), predictor (mask_token,
    decoder_pos_embed, decoder_pos_mlp, predictor_decoder_blocks.N, decoder_pred) and the momentum branch (mm_*)."""
    model = dict(timm_state_dict(objective.trained_encoder()))
    model.update({"decoder_embed.weight": torch.randn(192, 192), "decoder_embed.bias": torch.zeros(192),
                  "projector_decoder_blocks.0.norm1.bn.weight": torch.ones(192),
                  "projector_decoder_blocks.0.norm1.bn.running_mean": torch.zeros(192),
                  "mask_token": torch.zeros(1, 1, 192), "decoder_pred.weight": torch.randn(192, 192),
                  "mm_cls_token": model["cls_token"].clone(), "mm_blocks.0.attn.qkv.weight": torch.randn(576, 192)})
    return {"model": model, "optimizer": {}, "epoch": 1599, "args": argparse.Namespace(model="sim")}


def test_sims_checkpoint_loads_its_online_encoder(tmp_path: Path) -> None:
    source, cfg = objective_for("sim_vit_tiny")
    torch.save(sim_official(source), tmp_path / "sim.pth")
    target, _ = objective_for("sim_vit_tiny", seed=9)
    lines = load_initial_into(target, cfg, tmp_path / "sim.pth")
    ours = dict(source.trained_encoder().named_parameters())
    assert all(torch.equal(param, ours[name]) for name, param in target.trained_encoder().named_parameters())
    assert lines[0].startswith(f"model.init_from: {tmp_path / 'sim.pth'} (SIM checkpoint): {len(ours)} tensors")
    assert "starts fresh (the file has none): projector.embed (2 tensors), projector.blocks (24 tensors)" in lines[1]
    assert "decoder_embed" in lines[2] and "mm_cls_token" in lines[2]
    assert lines[-1] == "model.init_from: the teacher starts as the student's copy, as in every new run"


@pytest.mark.parametrize(("recipe", "model", "match"), [
    ("dino_vit_tiny", "vit_small_patch16_224", r"patch_embed.proj.weight has shape \(384, 3, 16, 16\), "
     r"vit_tiny_patch16's is \(192, 3, 16, 16\) \(the file holds a ViT of width 384, depth 12, patch 16: "
     r"model.name vit_small_patch16\)"),
    ("dino_vit_tiny", "vit_small_patch8_224", r"patch_embed.proj.weight has shape \(384, 3, 8, 8\).*patch 8: "
     r"model.name vit_small_patch8\)"),
    ("mae_vit_tiny", "vit_tiny_patch16_224", "not this objective's fixed sin-cos table"),
    ("dino_vit_tiny", "vit_small_patch14_reg4_dinov2", "register tokens"),
])
def test_a_file_that_is_not_this_encoder_is_refused_in_one_line(tmp_path: Path, recipe: str, model: str,
                                                                 match: str) -> None:
    torch.manual_seed(3)
    kwargs = {"img_size": 98 if "dinov2" in model else 96}
    state = timm.create_model(model, pretrained=False, num_classes=0, **kwargs).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "other.safetensors")
    objective, cfg = objective_for(recipe)
    with pytest.raises(ConfigError, match=match):
        import_file(tmp_path / "other.safetensors", objective, cfg)


class Payload:
    def __reduce__(self) -> tuple:
        return (print, ("this ran",))


@pytest.mark.parametrize(("content", "match"), [
    (b"not a checkpoint at all", "neither a safetensors file nor a torch checkpoint"),
    (pickle.dumps({"model": Payload()}, protocol=2), "cannot be read as a weights-only torch checkpoint"),
    (b"\x80\x02}q\x00.trunc", "cannot be read as a weights-only torch checkpoint"),
])
def test_an_unreadable_or_unsafe_file_is_refused_without_running_it(
        tmp_path: Path, content: bytes, match: str, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "weights.pth").write_bytes(content)
    objective, cfg = objective_for("dino_vit_tiny")
    with pytest.raises(ConfigError, match=match):
        import_file(tmp_path / "weights.pth", objective, cfg)
    assert "this ran" not in capsys.readouterr().out


def test_pretrain_starts_from_the_file_and_a_resumed_run_no_longer_needs_it(mini_shards: Path,
                                                                            tmp_path: Path) -> None:
    """The real command: a DINO run from a timm file says what it loaded; resumed after the file is gone (a
    requeued job must not need it), it trains on from its checkpoint and says it did not read the file."""
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm_vit().state_dict().items()}, weights)
    base = ["pretrain", "--config", "debug/dino_vit_tiny", f"data.train={mini_shards}", "run.name=warm",
            "tracking.enabled=false", "data.micro_batch_size=4", "optim.global_batch_size=4", "trainer.log_every=1",
            "trainer.ckpt_every=1", f"model.init_from={weights}"]
    first = run_largessl([*base, "trainer.max_steps=1"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"model.init_from: {weights} (safetensors under timm's names): 150 tensors loaded" in first.stdout
    weights.unlink()
    second = run_largessl([*base, "trainer.max_steps=2"], tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "model.init_from: not read (the run resumes from its checkpoint)" in second.stdout
    assert "done: 2 steps" in second.stdout


# ----------------------------------------------------------------------------- transformers' directories



def hf_vit(tmp_path: Path, kind: str = "vit", eps: float = 1e-6) -> tuple[Path, torch.nn.Module]:
    """A transformers ViTModel (or ViTMAEModel with no masking, or Dinov2Model) of ViT-Tiny/16's size with random
    weights, saved by save_pretrained; (its directory, the model)."""
    sizes = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                 image_size=96, patch_size=16, layer_norm_eps=eps)
    torch.manual_seed(4)
    if kind == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(**sizes), add_pooling_layer=False)
    elif kind == "vit_mae":
        model = transformers.ViTMAEModel(transformers.ViTMAEConfig(**sizes, mask_ratio=0.0))
        model.embeddings.patch_embeddings.projection._is_hf_initialized = False
        model.embeddings.initialize_weights()  # its fixed sin-cos table, as MAE's checkpoints hold it
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**{**sizes, "image_size": 98, "patch_size": 14}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "position_embeddings" not in name or kind != "vit_mae":  # ViT-MAE's table is fixed
                param.add_(0.02 * torch.randn_like(param))
    model.save_pretrained(tmp_path / kind)
    return tmp_path / kind, model.eval()


def test_a_transformers_vit_directory_starts_dino_with_its_features(tmp_path: Path) -> None:
    directory, model = hf_vit(tmp_path)
    objective, cfg = objective_for("dino_vit_tiny")
    imported = import_file(directory, objective, cfg)
    assert imported.form == "transformers ViTModel directory" and not imported.ignored and not imported.notes
    load_initial_into(objective, cfg, directory)
    with torch.no_grad():
        theirs = model(pixel_values=IMAGES).last_hidden_state
    assert torch.allclose(features(objective.trained_encoder()), theirs, atol=1e-5)


def test_transformers_4_names_read_as_transformers_5_names(tmp_path: Path) -> None:
    """A directory saved by transformers 4 (attention.attention.query, intermediate.dense, ...: the names of its
    modeling_vit.py) gives the same tensors as transformers 5's names."""
    directory, _ = hf_vit(tmp_path, eps=1e-12)
    from safetensors.torch import load_file

    old = {}
    for key, value in load_file(directory / "model.safetensors").items():
        for new, then in ((r"^layers\.", "encoder.layer."), (r"attention\.q_proj", "attention.attention.query"),
                          (r"attention\.k_proj", "attention.attention.key"),
                          (r"attention\.v_proj", "attention.attention.value"),
                          (r"attention\.o_proj", "attention.output.dense"), (r"mlp\.fc1", "intermediate.dense"),
                          (r"mlp\.fc2", "output.dense")):
            key = re.sub(new, then, key)
        old[key] = value
    (tmp_path / "old").mkdir()
    save_file(old, tmp_path / "old" / "model.safetensors")
    (tmp_path / "old" / "config.json").write_text((directory / "config.json").read_text())
    objective, cfg = objective_for("dino_vit_tiny")
    then, now = import_file(tmp_path / "old", objective, cfg), import_file(directory, objective, cfg)
    assert then.weights.keys() == now.weights.keys()
    assert all(torch.equal(then.weights[key], now.weights[key]) for key in now.weights)
    assert then.form == "transformers ViTModel directory; its layer norms' eps 1e-12, this encoder's 1e-06"


def test_a_transformers_vit_mae_directory_starts_mae_with_its_class_token_feature(tmp_path: Path) -> None:
    directory, model = hf_vit(tmp_path, kind="vit_mae")
    objective, cfg = objective_for("mae_vit_tiny")
    lines = load_initial_into(objective, cfg, directory)
    assert "starts fresh (the file has none): decoder" in lines[1]
    with torch.no_grad():  # no masking, but shuffled patches: compare the [cls] output
        theirs = model(pixel_values=IMAGES).last_hidden_state[:, 0]
    assert torch.allclose(features(objective.trained_encoder())[:, 0], theirs, atol=1e-5)


def test_dinov2_names_map_onto_timms_dinov2_and_are_refused_where_layer_scale_has_no_place(tmp_path: Path) -> None:
    directory, _ = hf_vit(tmp_path, kind="dinov2")
    from safetensors.torch import load_file

    from largessl.models.hf_format import to_timm

    ours, others = to_timm(load_file(directory / "model.safetensors"))
    theirs = timm.create_model("vit_tiny_patch16_224", img_size=98, patch_size=14, init_values=1.0,
                               num_classes=0).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert others == ["embeddings.mask_token"]
    objective, cfg = objective_for("dino_vit_tiny")
    with pytest.raises(ConfigError, match="the file's encoder has layer scale"):
        import_file(directory, objective, cfg)


def test_a_frozen_encoder_keeps_the_files_weights_while_the_fresh_decoder_learns(mini_shards: Path,
                                                                                 tmp_path: Path) -> None:
    """model.freeze_encoder_steps=2: after two optimizer steps the encoder is the file's, bit for bit, while MAE's
    fresh decoder has moved; the third step trains the encoder too."""
    from largessl.eval.standalone import load_encoder

    source, _ = objective_for("mae_vit_tiny")
    save_file(timm_state_dict(source.trained_encoder()), tmp_path / "mae.safetensors")
    done = run_largessl(["pretrain", "--config", "debug/mae_vit_tiny", f"data.train={mini_shards}", "run.name=frozen",
                         "tracking.enabled=false", "data.micro_batch_size=4", "optim.global_batch_size=4",
                         "trainer.log_every=1", "trainer.ckpt_every=1", "trainer.keep_last=3", "trainer.max_steps=3",
                         "optim.warmup_steps=0",
                         f"model.init_from={tmp_path / 'mae.safetensors'}", "model.freeze_encoder_steps=2"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step 2: parameter group decay:encoder. starts training" in done.stdout
    file = dict(source.trained_encoder().named_parameters())
    run = tmp_path / "runs" / "frozen"
    at = {step: dict(load_encoder(run, step)[0].named_parameters()) for step in (2, 3)}
    assert all(torch.equal(at[2][name], value) for name, value in file.items())
    assert not torch.equal(at[3]["blocks.0.attn.qkv.weight"], file["blocks.0.attn.qkv.weight"])
    from largessl.distributed.engine import read_checkpoint

    decoder = {step: read_checkpoint(run / "checkpoints" / f"step_{step:08d}")[0]["decoder.pred.weight"]
               for step in (1, 2)}
    assert not torch.equal(decoder[1], decoder[2])  # the decoder learned meanwhile


@pytest.mark.parametrize(("overrides", "said"), [
    (["model.freeze_encoder_steps=5"], "model.freeze_encoder_steps: keeps an encoder loaded by model.init_from"),
    (["model.init_from=x.pth", "model.freeze_encoder_steps=-1"], "model.freeze_encoder_steps: must be >= 0"),
])
def test_a_freeze_without_weights_to_keep_is_refused(overrides: list[str], said: str) -> None:
    with pytest.raises(ConfigError, match=said):
        load_config("debug/mae_vit_tiny", overrides)


@pytest.mark.parametrize("stage", [0, 3])
def test_a_dino_run_starts_its_teacher_from_the_files_teacher(mini_shards: Path, tmp_path: Path, stage: int) -> None:
    """DINO's full checkpoint into a real run, ZeRO-0 (a replicated fp32 teacher) and ZeRO-3 (partitioned): with
    teacher momentum 1 the teacher does not move, so the checkpoint's fp32 teacher is the file's, bit for bit."""
    from largessl.distributed.ema import read_teacher_fp32

    source, _ = objective_for("dino_vit_tiny")
    checkpoint = dino_official(source)
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    done = run_largessl(["pretrain", "--config", "debug/dino_vit_tiny", f"data.train={mini_shards}", "run.name=t",
                         "tracking.enabled=false", "data.micro_batch_size=4", "optim.global_batch_size=4",
                         "trainer.max_steps=1", "objective.teacher_momentum=1.0", f"distributed.zero_stage={stage}",
                         f"model.init_from={tmp_path / 'checkpoint.pth'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model.init_from: the teacher starts from the file's teacher" in done.stdout
    teacher = read_teacher_fp32(tmp_path / "runs" / "t" / "checkpoints" / "step_00000001")
    written = {f"teacher.backbone.{key}": value for key, value in timm_state_dict_names(checkpoint["teacher"]).items()}
    assert {name: teacher[name] for name in written}.keys() == written.keys()
    assert all(torch.equal(teacher[name], value) for name, value in written.items())
    assert torch.equal(teacher["teacher.head.mlp.0.weight"], checkpoint["teacher"]["head.mlp.0.weight"])


def timm_state_dict_names(teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's teacher backbone under our encoder's names (timm's, which DINO's encoder shares)."""
    return {key.removeprefix("backbone."): value for key, value in teacher.items() if key.startswith("backbone.")}


def test_a_dino_run_from_its_own_export_starts_its_teacher_as_the_export(mini_shards: Path, tmp_path: Path) -> None:
    """An exported DINO encoder (the teacher, timm's names) continued in a new run: the student starts as the
    export and the teacher as the student's copy, so with teacher momentum 1 the checkpoint's fp32 teacher
    backbone is the export, bit for bit (the same teacher features)."""
    from largessl.distributed.ema import read_teacher_fp32

    source, _ = objective_for("dino_vit_tiny")
    exported = timm_state_dict(source.trained_encoder())
    save_file(exported, tmp_path / "export.safetensors")
    done = run_largessl(["pretrain", "--config", "debug/dino_vit_tiny", f"data.train={mini_shards}", "run.name=e",
                         "tracking.enabled=false", "data.micro_batch_size=4", "optim.global_batch_size=4",
                         "trainer.max_steps=1", "objective.teacher_momentum=1.0",
                         f"model.init_from={tmp_path / 'export.safetensors'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model.init_from: the teacher starts as the student's copy, as in every new run" in done.stdout
    teacher = read_teacher_fp32(tmp_path / "runs" / "e" / "checkpoints" / "step_00000001")
    assert all(torch.equal(teacher[f"teacher.backbone.{key}"], value) for key, value in exported.items())


def test_a_file_without_qkv_biases_gets_zero_ones_and_keeps_its_features(tmp_path: Path) -> None:
    model = timm_vit(qkv_bias=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "vit.safetensors")
    objective, cfg = objective_for("dino_vit_tiny")
    imported = import_file(tmp_path / "vit.safetensors", objective, cfg)
    assert imported.notes == ["q, k and v biases set to 0 (the file's attention has none: the same function)"]
    load_initial_into(objective, cfg, tmp_path / "vit.safetensors")
    with torch.no_grad():
        theirs = model.forward_features(IMAGES)
    assert torch.allclose(features(objective.trained_encoder()), theirs, atol=1e-5)


def test_a_partial_encoder_is_refused_not_filled_with_random_weights(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in timm_vit().state_dict().items() if k != "blocks.5.mlp.fc2.bias"}
    save_file(state, tmp_path / "vit.safetensors")
    objective, cfg = objective_for("dino_vit_tiny")
    with pytest.raises(ConfigError, match=r"the file's encoder lacks blocks.5.mlp.fc2.bias \(a damaged or partial"):
        import_file(tmp_path / "vit.safetensors", objective, cfg)


def test_a_missing_file_is_said_before_torch_loads_and_nothing_is_written(mini_shards: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    done = run_largessl(["pretrain", "--config", "debug/mae_vit_tiny", f"data.train={mini_shards}", "run.name=m",
                         "tracking.enabled=false", f"model.init_from={tmp_path / 'absent.pth'}"], tmp_path)
    assert done.returncode == 2 and time.monotonic() - started < 5
    assert done.stderr.strip().splitlines() == [f"largessl: error: model.init_from: {tmp_path / 'absent.pth'} does not "
                                                "exist"]
    assert not (tmp_path / "runs").exists()
