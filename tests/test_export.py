"""`largessl export` on real checkpoints of real 2-step runs (MAE, DINO, CAE, SIM at ZeRO-0 and ZeRO-3, a real
SQLite MLflow store): timm builds the exported encoder with the printed line (safetensors + JSON) or from the
directory alone (local-dir:), with no key missing or left over, and gives our encoder's features on real images
within 1e-5 (fp32); DINO's export is the teacher, SIM's the online encoder with no final norm; the files are in the
MLflow run; --step picks an older checkpoint; bad inputs end with one line and exit code 2.

The safetensors export of MAE at ZeRO-0 and of the slow combinations goes through the command (a child process);
the others, the timm-directory exports (of the older step) and the bad inputs call `largessl.export.main` in this
process, which also shows that export needs no process group, and saves the ~8 s a child spends importing torch,
DeepSpeed and MLflow (the default part of this file has to stay near 90 s on 2 cores)."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from conftest import MINI_IMAGES, run_largessl
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import mlflow_client, ok

from largessl.data.transforms import EvalTransform
from largessl.distributed.ema import read_teacher_fp32
from largessl.distributed.engine import read_checkpoint
from largessl.eval.standalone import load_encoder
from largessl.export import main as export_main
from largessl.models.pos_embed import sincos_2d

POOL = {"mae": "cls", "dino": "cls", "cae": "mean", "sim": "mean"}  # the exported feature (CAE, SIM: mean of patches)
EXTRA = {"dino": ["model.image_size=32", "objective.local_crop_size=16", "objective.local_crops=2",
                  "objective.out_dim=1024", "objective.teacher_momentum=0.5"]}  # test_dino_train.py's small DINO
COMBOS = [("mae", 0), pytest.param("mae", 3, marks=pytest.mark.slow), pytest.param("dino", 0, marks=pytest.mark.slow),
          ("dino", 3), pytest.param("cae", 0, marks=pytest.mark.slow), ("cae", 3),
          pytest.param("sim", 0, marks=pytest.mark.slow),  # made room for test_eval_protocols' end-to-end probe
          pytest.param("sim", 3, marks=pytest.mark.slow)]  # sim-3: ~60 s on 2 busy cores
IN_PROCESS = {("dino", 3), ("cae", 3), ("sim", 0)}  # combinations whose safetensors export runs in this process


@dataclass
class Exported:
    method: str
    workdir: Path
    run_dir: Path
    stdout: str  # of `largessl export RUN_DIR` (newest checkpoint, safetensors)

    @property
    def sidecar(self) -> dict:
        return json.loads((self.run_dir / "export" / "step_00000002.json").read_text())


def train_and_export(method: str, stage: int, workdir: Path, shards: Path) -> Exported:
    """2 steps, a checkpoint after each, then both exports. The first step has lr 0 (warm-up from 0), the second a
    large one (0.0625): weights near their init (zero biases, layer scale 0.1) would hide a swapped q/v bias or
    a misplaced norm within 1e-5; after it they do not. DINO's teacher follows with momentum 0.5 for the same
    reason."""
    name = f"{method}{stage}"
    ok(run_largessl(["pretrain", "--config", f"debug/{method}_vit_tiny", f"data.train={shards}", f"data.val={shards}",
                     f"run.name={name}", "trainer.max_steps=2", "trainer.ckpt_every=1", "trainer.log_every=1",
                     "eval.knn_every=0", f"distributed.zero_stage={stage}", "data.micro_batch_size=8",
                     "optim.global_batch_size=8", "optim.warmup_steps=1", "optim.base_lr=2.0", "data.num_workers=0",
                     "data.shuffle_buffer=20", *EXTRA.get(method, [])], workdir))
    run_dir = workdir / "runs" / name
    if (method, stage) in IN_PROCESS:
        stdout = export_here([str(run_dir)])
    else:
        stdout = ok(run_largessl(["export", f"runs/{name}"], workdir)).stdout
    export_here([str(run_dir), "--format", "timm", "--step", "1"])
    assert not torch.distributed.is_initialized()
    return Exported(method, workdir, run_dir, stdout)


def export_here(argv: list[str]) -> str:
    """`largessl export ARGV` in this process, with the store the run recorded (as the child processes); its stdout."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert export_main(argv) == 0, out.getvalue()
    return out.getvalue()


@pytest.fixture(scope="module")
def exported(mini_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int], Exported]:
    """(method, ZeRO stage) -> its run, trained and exported once for the whole module."""
    workdir, runs = tmp_path_factory.mktemp("export"), {}

    def get(method: str, stage: int) -> Exported:
        if (method, stage) not in runs:
            runs[method, stage] = train_and_export(method, stage, workdir, mini_shards)
        return runs[method, stage]

    return get


def images(size: int) -> torch.Tensor:
    """Six real validation JPEGs as our k-NN sees them (EvalTransform), [6, 3, size, size]."""
    files = sorted((MINI_IMAGES / "val").rglob("*.JPEG"))[::33][:6]
    transform = EvalTransform(size)
    return torch.stack([transform(Image.open(path).convert("RGB"))["image"] for path in files])


def assert_same_features(model: torch.nn.Module, run: Exported, step: int) -> None:
    encoder, cfg, _, _ = load_encoder(run.run_dir, step)
    batch = images(cfg.model.image_size)
    with torch.no_grad():
        ours = encoder.eval().forward_pooled(batch, pool=POOL[run.method])
        theirs = model.eval()(batch)
    assert theirs.shape == ours.shape == (6, 192)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert ours.std() > 0.1  # real features, not a constant


@pytest.mark.parametrize("method,stage", COMBOS)
def test_safetensors_export_loads_strictly_with_the_printed_line_and_gives_our_features(
        exported: Callable, method: str, stage: int) -> None:
    run = exported(method, stage)
    spec, weights = run.sidecar, run.run_dir / "export" / "step_00000002.safetensors"
    usage = run.stdout.strip().splitlines()[-1]
    assert usage == spec["usage"] and usage.startswith("timm.create_model(")
    assert spec["pretrained_cfg_overlay"]["file"] == str(weights.resolve())
    assert spec["pretrained_cfg_overlay"]["num_classes"] == 0 == spec["kwargs"]["num_classes"]  # keeps timm strict
    assert (spec["step"], spec["method"], spec["model_name"]) == (2, method, "vit_tiny_patch16_224")
    model = eval(usage, {"timm": timm})  # the documented line, as printed
    assert_same_features(model, run, step=2)
    keys = model.load_state_dict(load_file(weights), strict=True)
    assert not keys.missing_keys and not keys.unexpected_keys
    same = timm.create_model(spec["model_name"], pretrained=True,
                             pretrained_cfg_overlay=spec["pretrained_cfg_overlay"], **spec["kwargs"])
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in same.state_dict().items())
    with safe_open(weights, "pt") as file:
        metadata = file.metadata()
    assert (metadata["run"], metadata["step"], metadata["method"]) == (f"{method}{stage}", "2", method)
    assert metadata["git_commit"] and metadata["timm_model"] == "vit_tiny_patch16_224"
    if method == "cae":  # layer scale, and the pooled feature is the mean of the normed patch tokens
        assert (spec["kwargs"]["init_values"], spec["kwargs"]["global_pool"], spec["kwargs"]["fc_norm"]) == (
            0.1, "avg", False)
    assert spec["kwargs"].get("final_norm", True) == (method != "sim")
    if method == "sim":  # the online encoder, no final norm, the mean of the un-normed patch tokens
        assert spec["encoder"] == "encoder" and (spec["kwargs"]["global_pool"], spec["kwargs"]["fc_norm"]) == (
            "avg", False)
        assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.fc_norm, torch.nn.Identity)
        weights = load_file(run.run_dir / "export" / "step_00000002.safetensors")
        assert not [key for key in weights if key.startswith(("norm.", "fc_norm."))]
        rows_first = sincos_2d(192, 6, rows_first=True)[None]  # SIM's layout, not MAE's
        assert torch.equal(weights["pos_embed"], rows_first) and not torch.equal(rows_first, sincos_2d(192, 6)[None])


@pytest.mark.parametrize("method,stage", COMBOS)
def test_timm_directory_of_an_older_step_loads_alone_and_gives_its_features(exported: Callable, method: str,
                                                                             stage: int) -> None:
    run = exported(method, stage)
    directory = run.run_dir / "export" / "step_00000001_timm"
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((directory / "config.json").read_text())
    assert (config["num_classes"], config["largessl"]["step"]) == (0, 1)
    model = timm.create_model(f"local-dir:{directory}", pretrained=True)
    assert model.num_classes == 0 and model.patch_embed.img_size == (config["model_args"]["img_size"],) * 2
    keys = model.load_state_dict(load_file(directory / "model.safetensors"), strict=True)
    assert not keys.missing_keys and not keys.unexpected_keys
    assert_same_features(model, run, step=1)
    newer = load_file(run.run_dir / "export" / "step_00000002.safetensors")
    last_norm = "blocks.11.norm2.bias" if run.method == "sim" else "norm.bias"  # SIM's encoder has no final norm
    for key in ("blocks.0.attn.qkv.bias", "blocks.11.mlp.fc2.weight", last_norm):  # step 2 moved them far
        assert (newer[key] - model.state_dict()[key]).abs().max() > 0.01, key
    assert not list(run.run_dir.glob("export/.*"))  # no temporary left beside them


@pytest.mark.parametrize("method,stage", COMBOS)
def test_the_files_are_artifacts_of_the_runs_mlflow_run(exported: Callable, method: str, stage: int) -> None:
    run = exported(method, stage)
    client = mlflow_client(f"sqlite:///{run.workdir / 'mlflow.db'}")
    run_id = json.loads((run.run_dir / "mlflow_run.json").read_text())["run_id"]
    assert f"to MLflow run {run_id} under export/" in run.stdout
    listed = {artifact.path for artifact in client.list_artifacts(run_id, "export")}
    assert listed == {"export/step_00000002.safetensors", "export/step_00000002.json", "export/step_00000001_timm"}
    inside = {item.path: item.file_size for item in client.list_artifacts(run_id, "export/step_00000001_timm")}
    size = (run.run_dir / "export" / "step_00000001_timm" / "model.safetensors").stat().st_size
    assert inside["export/step_00000001_timm/model.safetensors"] == size
    assert "export/step_00000001_timm/config.json" in inside


@pytest.mark.parametrize("method,stage", COMBOS)
def test_evaluation_reads_both_exports_back_into_the_runs_own_encoder(exported: Callable, method: str,
                                                                      stage: int) -> None:
    """`largessl eval --checkpoint EXPORT` (eval/source.py) rebuilds the encoder from the run config the export
    carries and maps timm's names back: every tensor equal to the checkpoint's, strictly loaded."""
    run = exported(method, stage)
    for export, step in ((run.run_dir / "export" / "step_00000001_timm", 1),
                         (run.run_dir / "export" / "step_00000002.safetensors", 2)):
        theirs, cfg, states, source = load_encoder(export)
        ours = load_encoder(run.run_dir, step)[0].state_dict()
        assert theirs.state_dict().keys() == ours.keys(), export
        assert all(torch.equal(value, ours[key]) for key, value in theirs.state_dict().items()), export
        assert cfg.objective.name == method and states["step"] == step and source.suffix == ".safetensors"
        recorded = json.loads((run.run_dir / "mlflow_run.json").read_text())["run_id"]
        assert states["mlflow_run_id"] == recorded  # results of the export are logged onto the run
    if method == "cae":  # step 2's unfolded q/v biases (no k part) and layer scales, moved far from their init
        assert ours["blocks.0.gamma_1"].sub(0.1).abs().max() > 1e-3 and ours["blocks.0.attn.v_bias"].abs().max() > 0


def test_an_export_that_evaluation_cannot_use_ends_in_one_line(exported: Callable, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from largessl.errors import UserError
    from largessl.eval.source import export_metadata, open_pretrained

    run = exported("mae", 0)
    export = run.run_dir / "export" / "step_00000002.safetensors"
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"), metadata={"format": "pt"})
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "notes.txt").write_text("x")
    cases = {(export, 5): "--step 5: ", (tmp_path / "plain.safetensors", None): "has no largessl run config",
             (tmp_path / "junk.safetensors", None): "is not a readable safetensors file",
             (tmp_path / "notes.txt", None): "is a file but not an export"}
    for (path, step), said in cases.items():
        with pytest.raises(UserError, match=said):
            open_pretrained(path, step)
    bad = load_file(export)
    bad["pos_embed"] = bad["pos_embed"] + 1  # a table that is not the layout's: another method's file
    save_file(bad, str(tmp_path / "other.safetensors"), metadata=export_metadata(export))
    with pytest.raises(UserError, match="does not match its own run config .*pos_embed"):
        load_encoder(tmp_path / "other.safetensors")


@pytest.mark.parametrize("method,stage", [pytest.param("dino", 0, marks=pytest.mark.slow), ("dino", 3)])
def test_dino_exports_the_teacher(exported: Callable, method: str, stage: int) -> None:
    run = exported(method, stage)
    assert run.sidecar["encoder"] == "teacher"
    tag_dir = run.run_dir / "checkpoints" / "step_00000002"
    teacher, student = read_teacher_fp32(tag_dir), read_checkpoint(tag_dir)[0]
    weights = load_file(run.run_dir / "export" / "step_00000002.safetensors")
    for key in ("blocks.0.attn.qkv.weight", "pos_embed", "cls_token", "norm.weight"):
        assert torch.equal(weights[key], teacher[f"teacher.backbone.{key}"]), key
    moved = (weights["blocks.0.attn.qkv.weight"] - student["student.backbone.blocks.0.attn.qkv.weight"]).abs().max()
    assert moved > 1e-3  # the teacher trails the student (momentum 0.5)


def test_bad_inputs_end_with_one_line_and_exit_code_2(exported: Callable, mini_shards: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    run = exported("mae", 0)
    before = sorted(p.name for p in (run.run_dir / "export").iterdir())
    (tmp_path / "file").write_text("")
    cases = {(str(mini_shards),): f"export: {mini_shards} is not a run directory (no config.yaml)",
             (str(run.run_dir), "--step", "7"): f"--step 7: {run.run_dir} has no complete checkpoint of that step "
                                                 "(complete: 1, 2)",
             (str(run.run_dir), "--out", str(tmp_path / "file" / "x.safetensors")): "--out: cannot make the directory",
             (str(run.run_dir), "--format", "timm", "--out", str(tmp_path / "file")): "--out: ",
             (str(tmp_path / "none"),): "is not a run directory"}
    for argv, said in cases.items():
        assert export_main(list(argv)) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("largessl: error: ") and said in err[0], (argv, err)
    assert sorted(p.name for p in (run.run_dir / "export").iterdir()) == before  # nothing written


HF_COMBOS = [("mae", 0), ("dino", 3), ("cae", 3)]  # the runs the default suite trains anyway
HF_CLASS = {"mae": "ViTModel", "dino": "ViTModel", "cae": "Dinov2Model"}


@pytest.mark.parametrize("method,stage", HF_COMBOS)
def test_hf_export_loads_with_automodel_and_gives_our_features(exported: Callable, method: str, stage: int,
                                                              tmp_path: Path) -> None:
    import transformers

    run = exported(method, stage)
    stdout = export_here([str(run.run_dir), "--format", "hf", "--out", str(tmp_path / "hf")])
    usage = stdout.strip().splitlines()[-1]
    assert usage == f"transformers.AutoModel.from_pretrained({str((tmp_path / 'hf').resolve())!r})"
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]
    model, info = transformers.AutoModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(model).__name__ == HF_CLASS[method]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    encoder, cfg, _, _ = load_encoder(run.run_dir, None)
    batch = images(cfg.model.image_size)
    with torch.no_grad():
        theirs, ours = model.eval()(pixel_values=batch).last_hidden_state, encoder.eval()(batch)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)  # every token, after the final norm
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert processor.size == {"height": cfg.model.image_size, "width": cfg.model.image_size}


@pytest.mark.parametrize("method,stage", HF_COMBOS)
def test_an_export_read_back_by_init_from_is_the_encoder_bit_for_bit(exported: Callable, method: str, stage: int,
                                                                    tmp_path: Path) -> None:
    """Export (safetensors, timm directory, transformers directory), then model.init_from: the trained encoder of
    a new run equals the exported one bit for bit (DINO: the teacher's, which the new run's teacher copies)."""
    from largessl.objectives import objective_class
    from largessl.weight_import import load_initial

    run = exported(method, stage)
    export_here([str(run.run_dir), "--format", "hf", "--out", str(tmp_path / "hf"), "--step", "1"])
    encoder, cfg, _, _ = load_encoder(run.run_dir, 1)
    exported_state = {name: value.detach() for name, value in encoder.named_parameters()}
    for source in (run.run_dir / "export" / "step_00000001_timm", tmp_path / "hf"):
        torch.manual_seed(5)
        objective = objective_class(method)(cfg.objective, cfg.model)
        cfg.model.init_from = str(source)
        load_initial(objective, cfg, resuming=False)
        started = dict(objective.trained_encoder().named_parameters())
        assert started.keys() == exported_state.keys()
        assert all(torch.equal(started[name], value) for name, value in exported_state.items()), source


def test_hf_export_of_a_method_without_a_transformers_class_ends_in_one_line(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    from largessl.config.load import dump_config, load_config

    (tmp_path / "sim").mkdir()
    (tmp_path / "sim" / "config.yaml").write_text(dump_config(load_config("debug/sim_vit_tiny", [])))
    assert export_main([str(tmp_path / "sim"), "--format", "hf"]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err == ("largessl: error: export: --format hf: SIM's encoder has no final norm, and transformers' ViT and "
                   "DINOv2 models always end in one: export it with --format timm (timm builds it with "
                   "final_norm=False)")
