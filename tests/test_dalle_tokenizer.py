"""The DALL-E dVAE tokenizer (CAE's target, methods.md 4.2-4.3), on a real but small, randomly initialised
dall_e Encoder saved the way OpenAI's encoder.pkl is (a torch.save of the whole module)."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MINI_IMAGES, REPO, child_env
from PIL import Image
from torch import nn

from largessl.errors import UserError
from largessl.models.dalle_tokenizer import KEY, DalleTokenizer, load_dalle_encoder

dall_e = pytest.importorskip("dall_e", reason='needs the dall_e package: pip install -e ".[dev]" (make install)')

VOCAB = 512  # the smallest vocabulary (and n_hid 64 the narrowest encoder) the dall_e Encoder accepts


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised dall_e Encoder pickled whole, as encoder.pkl."""
    with torch.random.fork_rng():  # leaves the session's global RNG as it was
        torch.manual_seed(0)
        encoder = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=VOCAB)
    path = tmp_path_factory.mktemp("dalle") / "encoder.pkl"
    torch.save(encoder, path)
    return path


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Four real 112-px Imagenette images as ToTensor gives them: [4, 3, 112, 112] in [0, 1]."""
    files = sorted((MINI_IMAGES / "train").rglob("*.JPEG"))[::125][:4]
    arrays = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def reference_ids(path: Path, images: torch.Tensor) -> torch.Tensor:
    """CAE's get_codebook_indices(...).flatten(1), written plainly from a freshly loaded copy of the encoder."""
    encoder = torch.load(path, weights_only=False)
    with torch.no_grad():
        return encoder(dall_e.map_pixels(images)).argmax(dim=1).flatten(1)


def test_token_ids_shape_range_and_determinism(encoder_file: Path, images: torch.Tensor) -> None:
    tokenizer = DalleTokenizer(encoder_file)
    ids = tokenizer.token_ids(images)
    assert ids.shape == (4, 196) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < VOCAB == tokenizer.vocab_size
    assert len(ids.unique()) > 10  # not one constant id: the test would not see a wrong argmax axis
    assert torch.equal(tokenizer.token_ids(images), ids)
    assert torch.equal(DalleTokenizer(encoder_file).token_ids(images), ids)
    assert tokenizer.token_ids(torch.rand(1, 3, 224, 224)).shape == (1, 784)  # t/8 squared at any size


def test_ids_match_a_plain_computation(encoder_file: Path, images: torch.Tensor) -> None:
    ids = DalleTokenizer(encoder_file).token_ids(images)
    assert torch.equal(ids, reference_ids(encoder_file, images))
    encoder = torch.load(encoder_file, weights_only=False)
    with torch.no_grad():
        logits = encoder(images * 0.8 + 0.1)  # map_pixels by hand
    assert logits.shape == (4, VOCAB, 14, 14)
    for b, row, col in [(0, 0, 0), (1, 0, 13), (2, 13, 0), (3, 6, 9)]:
        assert ids[b, row * 14 + col] == logits[b, :, row, col].argmax()  # row-major grid order


def test_frozen_and_without_graph(encoder_file: Path, images: torch.Tensor) -> None:
    tokenizer = DalleTokenizer(encoder_file)
    encoder = tokenizer.load()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    seen: list[torch.Tensor] = []
    encoder.blocks.output.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.enable_grad():
        ids = tokenizer.token_ids(images.clone().requires_grad_(True))
    assert ids.grad_fn is None and not ids.requires_grad
    assert seen[0].grad_fn is None and seen[0].dtype == torch.float32  # the logits built no graph
    rounded = images.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids = tokenizer.token_ids(rounded)
    assert torch.equal(ids, reference_ids(encoder_file, rounded.float()))
    assert seen[1].dtype == torch.float32  # autocast did not reach the encoder


@pytest.mark.parametrize("shape, dtype", [((3, 112, 112), torch.float32), ((1, 3, 100, 100), torch.float32),
                                          ((1, 3, 112, 112), torch.uint8)])
def test_wrong_images_are_refused(encoder_file: Path, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        DalleTokenizer(encoder_file).token_ids(torch.zeros(shape, dtype=dtype))


def bad_file(kind: str, tmp_path: Path, encoder_file: Path) -> Path:
    """A tokenizer_path that is not a DALL-E encoder pickle, of the given kind."""
    path = tmp_path / "encoder.pkl"
    if kind == "text":
        path.write_text("not a pickle\n")
    elif kind == "truncated":
        path.write_bytes(encoder_file.read_bytes()[:5000])
    elif kind == "state_dict":
        torch.save(torch.load(encoder_file, weights_only=False).state_dict(), path)
    elif kind == "other_module":
        torch.save(nn.Linear(2, 2), path)
    elif kind == "plain_pickle":
        path.write_bytes(pickle.dumps({"vocab_size": 8192}))
    elif kind == "directory":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind", ["missing", "directory", "text", "truncated", "state_dict", "other_module",
                                  "plain_pickle"])
def test_bad_tokenizer_file_is_one_user_error(kind: str, tmp_path: Path, encoder_file: Path) -> None:
    path = bad_file(kind, tmp_path, encoder_file)
    for attempt in (lambda: load_dalle_encoder(path), lambda: DalleTokenizer(path)):  # reported when it is made
        with pytest.raises(UserError) as caught:
            attempt()
        message = str(caught.value)
        assert message.startswith(f"{KEY}: ") and str(path) in message and "\n" not in message, message


def test_vocab_size_is_known_before_the_weights_load(encoder_file: Path) -> None:
    tokenizer = DalleTokenizer(encoder_file)
    assert tokenizer.vocab_size == VOCAB and "loaded=False" in repr(tokenizer)
    tokenizer.load()
    assert "loaded=True" in repr(tokenizer)


def test_without_dall_e_the_error_says_what_to_install(encoder_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dall_e", None)  # `import dall_e` now raises ImportError
    with pytest.raises(UserError, match=r'pip install "largessl\[dalle\]"') as caught:
        load_dalle_encoder(encoder_file)
    assert str(caught.value).startswith(KEY) and "\n" not in str(caught.value)


def test_module_imports_without_dall_e() -> None:
    code = "import sys, largessl.models.dalle_tokenizer; assert 'dall_e' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


class Holder(nn.Module):
    """A parent module holding the tokenizer the recommended way: a plain attribute."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.tokenizer = DalleTokenizer(path)
        self.head = nn.Linear(4, self.tokenizer.vocab_size)  # as CAE sizes its decoder


def test_parent_module_does_not_see_the_tokenizer(encoder_file: Path, images: torch.Tensor) -> None:
    parent = Holder(encoder_file)
    parent.tokenizer.token_ids(images)  # loaded
    assert [p.data_ptr() for p in parent.parameters()] == [parent.head.weight.data_ptr(), parent.head.bias.data_ptr()]
    assert list(parent.state_dict()) == ["head.weight", "head.bias"]
    assert [type(m) for m in parent.modules()] == [Holder, nn.Linear]
    parent.to(torch.bfloat16).requires_grad_(True)  # what DeepSpeed's mixed precision and optimizer do to a module
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in parent.tokenizer.load().parameters())
    assert torch.equal(parent.tokenizer.token_ids(images), reference_ids(encoder_file, images))


ZERO3_BUILD = """
import sys
import torch
from torch import nn
from largessl.distributed.config import DistributedConfig
from largessl.distributed.engine import deepspeed_config, init_distributed, model_init_context
from largessl.models.dalle_tokenizer import DalleTokenizer


class Holder(nn.Module):
    def __init__(self, path):
        super().__init__()
        self.tokenizer = DalleTokenizer(path)
        self.head = nn.Linear(4, self.tokenizer.vocab_size)


cfg = DistributedConfig(zero_stage=3, precision="bf16")
env = init_distributed(cfg)
ds = deepspeed_config(cfg, micro_batch=1, accumulation=1, world_size=1, grad_clip=0.0)
with model_init_context(ds):
    parent = Holder(sys.argv[1])  # reads the file (onto "meta") inside zero.Init
    try:
        parent.tokenizer.load()
        raise SystemExit("loading inside zero.Init was not refused")
    except RuntimeError as exc:
        assert "inside deepspeed.zero.Init" in str(exc), exc
assert parent.head.weight.dtype == torch.bfloat16 and hasattr(parent.head.weight, "ds_id")  # zero.Init was on
images = torch.rand(2, 3, 112, 112)
ids = parent.tokenizer.token_ids(images)
encoder = torch.load(sys.argv[1], weights_only=False)
with torch.no_grad():
    assert torch.equal(ids, encoder(images * 0.8 + 0.1).argmax(1).flatten(1))
assert all(p.dtype == torch.float32 and not hasattr(p, "ds_id") for p in parent.tokenizer.load().parameters())
print("ok")
"""


def test_built_inside_zero_init_it_loads_whole_and_fp32(encoder_file: Path, tmp_path: Path) -> None:
    env = {**child_env(tmp_path), "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(ZERO3_BUILD), str(encoder_file)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout[-2000:] + result.stderr[-3000:]
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_moves_to_the_images_device_on_first_use(encoder_file: Path, images: torch.Tensor) -> None:
    tokenizer = DalleTokenizer(encoder_file)
    on_cpu = tokenizer.token_ids(images)
    on_gpu = tokenizer.token_ids(images.cuda())
    assert on_gpu.device.type == "cuda" and next(tokenizer.load().parameters()).device.type == "cuda"
    assert (on_gpu.cpu() == on_cpu).float().mean() > 0.95  # fp32 (or TF32) convolutions: ties may break apart
