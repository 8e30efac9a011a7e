"""`largessl export`: a run's encoder as timm `vision_transformer` weights (safetensors), loadable in one line.

The encoder is the one the papers evaluate (`objective.eval_encoder()`: DINO's EMA teacher, MAE's, CAE's and
SIM's (online) encoder), read from any ZeRO stage's checkpoint without a process group and converted to timm's names
(models/timm_format.py). Before anything is written, the weights are loaded into the timm model strictly and its
features compared with ours: a converter bug stops the export. Formats (docs/export.md): `safetensors`, a file plus
a JSON with the `create_model` arguments, and `timm`, a directory that `timm.create_model("local-dir:DIR",
pretrained=True)` loads alone. Every file is written atomically; the export is logged to the run's MLflow run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from largessl.errors import UserError
from largessl.files import UMASK, write_atomic

if TYPE_CHECKING:
    import torch

FORMATS = ("safetensors", "timm", "hf")


def add_parser(commands: argparse._SubParsersAction) -> None:
    from largessl.commandline import HelpFormatter

    export = commands.add_parser(
        "export", help="write a checkpoint's encoder as timm weights", formatter_class=HelpFormatter,
        description=(
            "Write the encoder of a run's checkpoint (DINO: the teacher) in timm's vision_transformer naming\n"
            "(docs/export.md), into RUN_DIR/export/ unless --out says where, and log it to the run's MLflow run.\n"
            "Prints last the Python line that loads it."))
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory")
    export.add_argument("--step", type=int, metavar="N", help="the checkpoint of step N (default: the newest complete)")
    export.add_argument("--format", choices=FORMATS, default="safetensors",
                        help="safetensors: FILE + FILE.json with the create_model arguments; timm: a directory for "
                             "timm.create_model('local-dir:DIR', pretrained=True); hf: a directory for "
                             "transformers.AutoModel.from_pretrained(DIR) (MAE, DINO: ViTModel; CAE: Dinov2Model; "
                             "needs transformers)")
    export.add_argument("--out", type=Path, metavar="PATH",
                        help="the file (safetensors) or directory (timm, hf) to write (default: RUN_DIR/export/"
                             "step_NNNNNNNN.safetensors, step_NNNNNNNN_timm/ or step_NNNNNNNN_hf/)")


def main(argv: list[str]) -> int:
    """`largessl export ARGV...` on its own parser (argv without the word 'export')."""
    from largessl.commandline import Parser, report_failure

    parser = Parser(prog="largessl")
    add_parser(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    args = parser.parse_args(["export", *argv])
    try:
        return run(args)
    except Exception as exc:
        return report_failure(exc)


def run(args: argparse.Namespace) -> int:
    """Export, say where, log to MLflow, print the loading line last. Errors the user can fix are UserErrors."""
    if args.out is not None:
        check_out(args.out, args.format, "--out")
    if args.format == "hf":
        check_hf_possible(args.run_dir)
    from largessl.checkpoint import checkpoint_of

    checkpoint_of(args.run_dir, args.step, arg="export")  # a wrong path or step is said before torch loads
    from largessl.eval.standalone import load_encoder

    encoder, cfg, states, tag_dir = load_encoder(args.run_dir, args.step, arg="export")
    step, method = int(states.get("step", 0)), cfg.objective.name
    role = encoder_role(method)
    print(f"checkpoint {tag_dir} (step {step}): {method}, its {role}", flush=True)
    from largessl.models.timm_format import POOL, build_timm, check_features, timm_kwargs, timm_name, timm_state_dict

    name, kwargs = timm_name(cfg), timm_kwargs(cfg, encoder)
    state = timm_state_dict(encoder.eval())
    diff = check_features(encoder, build_timm(name, kwargs, state), POOL.get(method, "cls"), cfg.model.image_size)
    print(f"timm {name} ({call_args(kwargs)}): loads strictly, features within {diff:.1e} of ours", flush=True)
    out = args.out or default_out(args.run_dir, step, args.format)
    check_out(out, args.format, "--out" if args.out else "export")
    from largessl.tracking import git_commit

    info = {"run": cfg.run.name, "run_dir": str(args.run_dir.resolve()), "checkpoint": str(tag_dir.resolve()),
            "step": step, "method": method, "encoder": role, "git_commit": git_commit()}
    if args.format == "hf":
        written, usage = write_hf(out, encoder, cfg, state, info)
    else:
        written, usage = write_export(out, args.format, state, name, kwargs, info, cfg.model.image_size,
                                      evaluation_metadata(args.run_dir, cfg, states))
    run_id = log_to_run(states, cfg, args.run_dir, written)
    if run_id:
        print(f"logged {', '.join(p.name for p in written)} to MLflow run {run_id} under export/")
    print(usage)
    return 0


# ----------------------------------------------------------------------------- which encoder


def encoder_role(method: str) -> str:
    """'teacher' when the objective evaluates another module than its online encoder (DINO's EMA teacher), else
    'encoder'. An EMA teacher alone does not make it one: SIM's target branch is not its eval encoder."""
    from largessl.objectives import objective_class
    from largessl.objectives.base import Objective

    return "teacher" if objective_class(method).eval_encoder is not Objective.eval_encoder else "encoder"


# ----------------------------------------------------------------------------- files


def default_out(run_dir: Path, step: int, fmt: str) -> Path:
    stem = f"step_{step:08d}"
    return run_dir / "export" / (f"{stem}.safetensors" if fmt == "safetensors" else f"{stem}_{fmt}")


def check_out(out: Path, fmt: str, what: str) -> None:
    """Before writing: `out` is of the right kind (a file for safetensors, a directory for timm) and its directory
    can be made and written; errors name `what` (--out, or export for the default path)."""
    if fmt == "safetensors" and (out.is_dir() or out.suffix == ".json"):
        raise UserError(f"{what}: {out} is a directory or ends in .json (--format safetensors writes FILE and "
                        "FILE's .json beside it)")
    if fmt != "safetensors" and out.exists() and not out.is_dir():
        raise UserError(f"{what}: {out} is a file (--format {fmt} writes a directory)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{what}: cannot make the directory {out.parent} ({exc.strerror or exc})") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UserError(f"{what}: cannot write in {out.parent} (permission denied)")


def evaluation_metadata(run_dir: Path, cfg: Any, states: dict[str, Any]) -> dict[str, str]:
    """What `largessl eval --checkpoint EXPORT` needs (eval/source.py): the run's resolved config, which rebuilds
    the encoder's layout, and its MLflow run, which the results are logged onto."""
    from largessl.eval.source import CONFIG_KEY
    from largessl.tracking import recorded_run

    run_id, uri = recorded_run(cfg.tracking, run_dir, states.get("mlflow_run_id") or "",
                               states.get("tracking_uri") or "")
    return {CONFIG_KEY: (run_dir / "config.yaml").read_text(), "mlflow_run_id": run_id, "tracking_uri": uri}


def write_export(out: Path, fmt: str, state: dict[str, torch.Tensor], name: str, kwargs: dict[str, Any],
                 info: dict[str, Any], image_size: int, extra: dict[str, str]) -> tuple[list[Path], str]:
    """Write the export (each file atomically); returns (what was written, the Python line that loads it). `extra`
    goes into the safetensors metadata only."""
    meta = {"format": "pt", **{key: str(value) for key, value in info.items()}, "timm_model": name,
            "timm_kwargs": json.dumps(kwargs), **extra}
    blob = safetensors_bytes(state, meta)
    if fmt == "timm":
        config = hub_config(name, kwargs, preprocessing(image_size), info)
        write_dir_atomic(out, {"model.safetensors": blob, "config.json": json.dumps(config, indent=2) + "\n"})
        report(out / "model.safetensors", len(blob), "and config.json beside it")
        return [out], f"timm.create_model({f'local-dir:{out.resolve()}'!r}, pretrained=True)"
    overlay = {"file": str(out.resolve()), "num_classes": 0, **preprocessing(image_size)}
    usage = (f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict({call_args(overlay)}), "
             f"{call_args(kwargs)})")
    write_atomic(out, blob)
    report(out, len(blob), "")
    sidecar = out.with_suffix(".json")
    write_atomic(sidecar, json.dumps({"model_name": name, "kwargs": kwargs, "pretrained_cfg_overlay": overlay,
                                      **info, "usage": usage}, indent=2) + "\n")
    print(f"wrote {sidecar} (timm model name, create_model arguments, provenance)")
    return [out, sidecar], usage


def check_hf_possible(run_dir: Path) -> None:
    """--format hf, before torch loads: transformers is installed and the run's method has a transformers class."""
    import importlib.util

    from largessl.eval.source import run_config
    from largessl.models.hf_format import NO_COUNTERPART

    method = run_config(run_dir, "export").objective.name
    if method in NO_COUNTERPART:
        raise UserError(f"export: --format hf: {NO_COUNTERPART[method]}")
    if importlib.util.find_spec("transformers") is None:
        raise UserError("export: --format hf needs transformers (pip install 'largessl[hf]')")


def write_hf(out: Path, encoder: Any, cfg: Any, state: dict[str, torch.Tensor],
             info: dict[str, Any]) -> tuple[list[Path], str]:
    """The transformers directory (models/hf_format.py): config.json, model.safetensors (transformers 4's names,
    which 5 reads too), preprocessor_config.json; loaded by AutoModel and its features compared with ours in the
    temporary directory, before it takes `out`'s name."""
    from largessl.models import hf_format
    from largessl.models.timm_format import FEATURE_ATOL

    kind = hf_format.HF_KIND[cfg.objective.name]
    config = {**hf_format.hf_config(kind, cfg.model.dims, cfg.model.image_size, cfg.model.patch_size),
              "largessl": info}
    blob = safetensors_bytes(hf_format.from_timm(state, kind), {"format": "pt"})
    files = {"model.safetensors": blob, "config.json": json.dumps(config, indent=2) + "\n",
             "preprocessor_config.json": json.dumps(image_processor(cfg.model.image_size), indent=2) + "\n"}
    diffs: list[float] = []
    write_dir_atomic(out, files, lambda tmp: diffs.append(
        hf_format.check_directory(tmp, encoder, cfg.model.image_size, FEATURE_ATOL)))
    name = config["architectures"][0]
    print(f"transformers {name}: loads with no key missing or left over, features within {diffs[0]:.1e} of ours",
          flush=True)
    report(out / "model.safetensors", len(blob), "config.json and preprocessor_config.json beside it")
    return [out], f"transformers.AutoModel.from_pretrained({str(out.resolve())!r})"


def image_processor(image_size: int) -> dict[str, Any]:
    """preprocessor_config.json for transformers' ViTImageProcessor: our evaluation view's size and ImageNet's
    mean and std, bicubic (its resize is to the square, without timm's 256/224 crop)."""
    from largessl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": image_size, "width": image_size}, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD)}


def preprocessing(image_size: int) -> dict[str, Any]:
    """timm's data config for our evaluation view (EvalTransform): bicubic resize by 256/224, centre crop."""
    from largessl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    return {"input_size": (3, image_size, image_size), "interpolation": "bicubic", "crop_pct": 0.875,
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def hub_config(name: str, kwargs: dict[str, Any], data: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """config.json as timm's save_for_hf writes it, read by timm's load_model_config_from_path (local-dir:)."""
    model_args = {key: value for key, value in kwargs.items() if key != "num_classes"}
    pretrained_cfg = {**data, "num_classes": 0, "fixed_input_size": True, "first_conv": "patch_embed.proj",
                      "classifier": "head"}
    return {"architecture": name, "num_classes": 0, "num_features": kwargs["embed_dim"],
            "global_pool": kwargs["global_pool"], "model_args": model_args, "pretrained_cfg": pretrained_cfg,
            "largessl": info}


def safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save(state, metadata=metadata)


def write_dir_atomic(out: Path, files: dict[str, str | bytes], check: Callable[[Path], None] | None = None) -> None:
    """Write `files` into a temporary directory beside `out`, `check` it there, then rename it to `out` (an older
    one is replaced after the new one is whole)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for name, data in files.items():
            write_atomic(tmp / name, data)
        if check is not None:
            check(tmp)
        os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp's directories are private
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def report(path: Path, size: int, more: str) -> None:
    print(f"wrote {path} ({size / 1e6:.1f} MB{', ' + more if more else ''})", flush=True)


def call_args(values: dict[str, Any]) -> str:
    """`key=value, ...` as Python source (tuples stay tuples)."""
    return ", ".join(f"{key}={value!r}" for key, value in values.items())


# ----------------------------------------------------------------------------- MLflow


def log_to_run(states: dict, cfg: Any, run_dir: Path, paths: list[Path]) -> str:
    """Copy `paths` under export/ of the run's MLflow run, found as `largessl eval knn` finds it; '' when tracking
    is off, the run is unknown or the store did not take them (then one warning says why)."""
    from largessl.tracking import attach_recorded

    tracker = attach_recorded(cfg.tracking, run_dir, states)
    for path in paths:
        if tracker.run_id:
            tracker.log_artifact(path, "export")
    return tracker.run_id
