"""CAE's target tokenizer: OpenAI's DALL-E dVAE encoder, frozen (methods.md 4.2 and 4.3).

The target of a masked patch is the id the dVAE encoder gives it: map_pixels(x) = x * (1 - 2 * 0.1) + 0.1 on the
[0, 1] (ToTensor) 112-px Lanczos view, the encoder's logits over its vocabulary (8192 for the official weights),
their argmax, flattened row-major: 112 px -> 14 x 14 = 196 ids, one per 16-px patch of the 224-px view. This is
CAE's `d_vae.get_codebook_indices(img112).flatten(1)`.

The weights are OpenAI's `encoder.pkl`, a torch.save of the whole `dall_e.Encoder` module. It is never trained,
never partitioned by DeepSpeed and never saved in our checkpoints: see `DalleTokenizer` for how an objective
holds it. The `dall_e` package (`pip install "largessl[dalle]"`) is imported only when a tokenizer is loaded.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from largessl.errors import UserError, one_line

KEY = "objective.tokenizer_path"
INSTALL = 'pip install "largessl[dalle]" (or dall-e==0.1)'
DOWNSAMPLE = 8  # the encoder's three 2x max-pools: a t-px image gives a (t/8) x (t/8) grid of ids


def import_dall_e() -> ModuleType:
    """OpenAI's dall_e package, imported here so that the rest of largessl runs without it."""
    try:
        import dall_e
    except ImportError as exc:
        raise UserError(f"{KEY}: the DALL-E tokenizer needs the dall_e package ({exc}): {INSTALL}") from None
    return dall_e


def require_file(path: Path) -> None:
    """The tokenizer file is there (the mistake worth reporting before anything is built)."""
    if not path.is_file():
        raise UserError(f"{KEY}: {path} is not a file; expected the DALL-E dVAE encoder.pkl")


def load_dalle_encoder(path: str | Path, map_location: str = "cpu") -> nn.Module:
    """The `dall_e.Encoder` pickled in `path` (OpenAI's encoder.pkl), on `map_location` ("meta": checked and its
    attributes read without any weights in memory); a UserError naming objective.tokenizer_path if the file is
    missing, unreadable, not a torch pickle or holds something else.

    Only load a file you trust: a pickled module loads only with torch.load(weights_only=False) (the default,
    weights_only=True, refuses it, and so does dall_e.load_model on torch >= 2.6), which runs the file's pickle
    code. The official encoder.pkl from OpenAI is such a trusted file.
    """
    dall_e = import_dall_e()
    path = Path(path)
    require_file(path)
    module = _unpickle(path, map_location)
    if not isinstance(module, dall_e.Encoder):
        raise UserError(f"{KEY}: {path} is not a pickled DALL-E dVAE Encoder (encoder.pkl): it holds "
                        f"{type(module).__name__}")
    return module


def _unpickle(path: Path, map_location: str) -> object:
    """torch.load of a whole pickled module; any failure becomes one line naming the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # a bad file fails in many ways: UnpicklingError, EOFError, RuntimeError, OSError, ...
        reason = f"{type(exc).__name__}: {one_line(exc)}"
        raise UserError(f"{KEY}: cannot load {path} as a torch pickle ({reason})") from None


def freeze(encoder: nn.Module, *, cuda_fp16: bool) -> nn.Module:
    """Eval mode and no gradients; unless `cuda_fp16`, fp32 convolutions on CUDA too.

    dall_e's Conv2d casts its input and weights to fp16 on CUDA (`use_float16`, set on every convolution but the
    output one), so the official CAE targets were computed that way on GPUs. We turn it off by default so that the
    ids do not depend on the device; the two should differ only where two logits nearly tie. (cuDNN's TF32 setting, a
    process-wide choice, still applies to the fp32 convolutions.)
    """
    _require_fp32(encoder)
    encoder.eval().requires_grad_(False)
    conv = import_dall_e().utils.Conv2d
    for module in encoder.modules():
        if isinstance(module, conv):
            module.use_float16 = module.use_float16 and cuda_fp16
    return encoder


def _require_fp32(encoder: nn.Module) -> None:
    """fp32 weights, as saved. Loaded inside a bf16 (or fp16) deepspeed.zero.Init they come back in that dtype and
    are garbage: its patched torch.empty gives torch.load bf16 tensors, which then view the fp32 bytes as bf16."""
    dtypes = {p.dtype for p in encoder.parameters()}
    if dtypes != {torch.float32}:
        raise RuntimeError(f"the DALL-E encoder's weights loaded as {sorted(map(str, dtypes))}, not fp32, so they are "
                           "garbage: it was loaded inside deepspeed.zero.Init; load it after the model is built")


def check_images(images_01: torch.Tensor) -> None:
    """[B, C, H, W] floats in [0, 1] (ToTensor), H and W multiples of 8 so that the grid is exactly (H/8, W/8)."""
    shape = tuple(images_01.shape)
    if len(shape) != 4 or shape[2] % DOWNSAMPLE or shape[3] % DOWNSAMPLE or not images_01.is_floating_point():
        raise ValueError(f"the DALL-E tokenizer takes [B, 3, H, W] float images in [0, 1] with H and W multiples "
                         f"of {DOWNSAMPLE}; got {shape} {images_01.dtype}")


class DalleTokenizer:
    """The frozen DALL-E dVAE encoder that gives CAE its targets: `token_ids(images_01)`, `vocab_size`.

    A plain object, not an nn.Module, on purpose: an objective holds it as an ordinary attribute
    (`self.tokenizer = DalleTokenizer(cfg.tokenizer_path)` in its __init__), which nn.Module keeps in the
    instance __dict__, outside the module tree. So DeepSpeed never sees it: its optimizer, ZeRO-3 partitioning and
    parameter hooks, its bf16/fp16 cast of the module's parameters and its checkpoints all walk
    parameters()/modules()/state_dict(), and none of them reach it. Nor does the parent's .to(): the encoder
    moves to the images' device on first use (it is a full copy on every rank, about 54M parameters in fp32).

    Made, it reads the file onto the "meta" device: every bad file is reported then, and `vocab_size` is known
    (the objective sizes its decoder by it), with no weights in memory. The weights load on the first `load()` or
    `token_ids`. They must not load while the objective is built: under ZeRO-3 that is inside deepspeed.zero.Init,
    which garbles what torch.load makes there (see `_require_fp32`); meta tensors it cannot harm.
    """

    def __init__(self, path: str | Path, *, cuda_fp16: bool = False) -> None:
        """`path`: objective.tokenizer_path; `cuda_fp16`: keep dall_e's fp16 convolutions on CUDA (see `freeze`)."""
        self.path = Path(path)
        self.cuda_fp16 = cuda_fp16
        self._encoder: nn.Module | None = None
        self._vocab_size = int(load_dalle_encoder(self.path, map_location="meta").vocab_size)

    def load(self) -> nn.Module:
        """The frozen encoder, loaded from `path` (onto the CPU) on the first call and kept."""
        if self._encoder is None:
            self._encoder = freeze(load_dalle_encoder(self.path), cuda_fp16=self.cuda_fp16)
        return self._encoder

    @property
    def vocab_size(self) -> int:
        """How many token ids there are (the encoder's own `vocab_size`; 8192 for OpenAI's weights)."""
        return self._vocab_size

    def flops(self, size: int) -> float:
        """Forward FLOPs of the encoder on one size x size image: counted by torch's FlopCounterMode on the
        meta device (the architecture's convolutions, no weights read)."""
        from torch.utils.flop_counter import FlopCounterMode

        encoder = load_dalle_encoder(self.path, map_location="meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            encoder(torch.empty(1, 3, size, size, device="meta"))
        return float(counter.get_total_flops())

    def token_ids(self, images_01: torch.Tensor) -> torch.Tensor:
        """[B, 3, t, t] images in [0, 1] -> LongTensor [B, (t/8)^2] of ids, row-major, without gradients.

        fp32 whatever the caller's autocast or the images' dtype, eval mode, no graph.
        """
        check_images(images_01)
        encoder = self._on(images_01.device)
        with torch.no_grad(), torch.autocast(images_01.device.type, enabled=False):
            logits = encoder(import_dall_e().map_pixels(images_01.float()))
        return logits.argmax(dim=1).flatten(1)

    def _on(self, device: torch.device) -> nn.Module:
        """The encoder on `device`, moved there on first use (the parent's .to() does not reach it)."""
        encoder = self.load()
        if next(encoder.parameters()).device != device:
            encoder.to(device)
        return encoder

    def __repr__(self) -> str:
        """Names the file and whether it is loaded (the parent module's repr does not show this attribute)."""
        return f"DalleTokenizer({str(self.path)!r}, loaded={self._encoder is not None})"
