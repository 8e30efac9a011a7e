"""SIM on the CPU: the two views' relative geometry checked against rendered pixels (a coordinate image and a real
JPEG), the relative sin-cos encoding, the transform's outputs and seeding, the UniGrad loss and target correlation
against the released n x n computation, and the token batch norm against torch's BatchNorm1d, in one process and
synchronised over two (tests/sim_sync_worker.py under torchrun)."""

from __future__ import annotations

import copy
import itertools
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sim_sync_worker
import torch
import torch.nn.functional as F
from conftest import REPO, child_env, free_port
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from largessl.data.siamese import SIMTransform, ViewBox, relative_geometry
from largessl.models.batchnorm import TokenSyncBatchNorm
from largessl.models.pos_embed import sincos_2d, sincos_relative
from largessl.objectives.sim import TargetCorrelation, unigrad_loss

JPEGS = sorted((REPO / "demo" / "imagenette-mini" / "train").rglob("*.JPEG"))
CROP_SCALE, CROP_RATIO = [0.08, 1.0], [3 / 4, 4 / 3]
FLIPS = list(itertools.product([False, True], repeat=2))  # (flip of view 1, flip of view 2)
SOURCE_HEIGHT, SOURCE_WIDTH = 300, 400  # the coordinate image: non-square, so the image width matters
DIM = 64  # embedding width for the geometry checks: 16 frequencies per block
MARGIN = 1.0  # patches: a view-2 patch is checked only when it maps this far inside view 1's patch centres' hull
PIXEL_TOL = 0.1
"""Source pixels. Bicubic upsampling reproduces a linear ramp to float32 rounding (~1e-4 px at 400 px) and
bilinear sampling of a rendered view is exact on it; the antialiased (downscaling) bicubic kernel, renormalised
over the pixels it covers, reproduces it only to ~0.02 px in the interior. Two views: <= ~0.04 px. A geometry
error of half a view-1 patch, the smallest convention slip (centres vs corners), is >= 3 px here."""


# ----------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Many small tensor ops: on a shared machine torch's thread pool costs far more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def coordinate_image(height: int = SOURCE_HEIGHT, width: int = SOURCE_WIDTH) -> torch.Tensor:
    """[2, H, W] float32: channel 0 the source column x + 0.5, channel 1 the source row y + 0.5 (pixel centres)."""
    rows, cols = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return torch.stack([cols, rows]).float()


def sample(view: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Bilinear samples [C, n] of a rendered view [C, S, S] at continuous pixel coordinates (rows, cols) [n]
    (pixel k spans [k, k + 1))."""
    size = view.shape[-1]
    grid = torch.stack([2 * cols / size - 1, 2 * rows / size - 1], dim=-1).view(1, 1, -1, 2).to(view.dtype)
    return F.grid_sample(view[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0]


def patch_grid(grid_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices [G*G] float64 of the patches, row-major."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return rows.flatten().double(), cols.flatten().double()


def positions_from_boxes(box1: ViewBox, box2: ViewBox, image_width: int,
                         grid_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where view 2's patch centres lie in view 1's patch-index frame, by pixel geometry alone (no relative
    geometry): a view maps its continuous pixel u to left + u w / S of its own (mirrored if flipped) source frame,
    and a column u of one frame is the column W - u of the other."""
    rows, cols = patch_grid(grid_size)
    source_row = box2.top + (rows + 0.5) * box2.height / grid_size
    column2 = box2.left + (cols + 0.5) * box2.width / grid_size  # in view 2's frame
    column1 = column2 if box1.flip == box2.flip else image_width - column2  # the same point in view 1's frame
    y = (source_row - box1.top) * grid_size / box1.height - 0.5
    x = (column1 - box1.left) * grid_size / box1.width - 0.5
    return y, x


def positions_from_geometry(geometry: torch.Tensor, grid_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """methods.md 5.1.4, re-implemented: y = dh (r + .5) + di G - .5; x = dw (c + .5) + dj G - .5, or
    -dw (c + .5) + dj_flip G - .5 when flip."""
    di, dj, dh, dw, flip, dj_flip = geometry.double().tolist()
    rows, cols = patch_grid(grid_size)
    y = dh * (rows + 0.5) + di * grid_size - 0.5
    x = (-dw * (cols + 0.5) + dj_flip * grid_size if flip else dw * (cols + 0.5) + dj * grid_size) - 0.5
    return y, x


def omegas(dim: int) -> torch.Tensor:
    """w_k = 10000^(-k / (dim / 4)), k = 0 .. dim/4 - 1 (methods.md 1.2)."""
    quarter = dim // 4
    return 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)


def encode_positions(dim: int, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[n, dim]: [sin(y w), cos(y w), sin(x w), cos(x w)], the rows-first layout of SIM's tables."""
    wy, wx = y[:, None] * omegas(dim), x[:, None] * omegas(dim)
    return torch.cat([wy.sin(), wy.cos(), wx.sin(), wx.cos()], dim=1)


def decode_positions(embedding: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x) [n] float64 back from the first `dim` channels of sincos_relative: the phase at the lowest frequency
    (unambiguous for |p| < pi / w_min ~ 17,700 patches), refined frequency by frequency up to w_0 = 1."""
    quarter, w = dim // 4, omegas(dim)
    decoded = []
    for block in (0, 2):
        sines = embedding[:, block * quarter:(block + 1) * quarter].double()
        cosines = embedding[:, (block + 1) * quarter:(block + 2) * quarter].double()
        phase = torch.atan2(sines, cosines)
        estimate = phase[:, -1] / w[-1]
        for k in reversed(range(quarter - 1)):
            residual = torch.remainder(phase[:, k] - estimate * w[k] + math.pi, 2 * math.pi) - math.pi
            estimate = estimate + residual / w[k]
        decoded.append(estimate)
    return decoded[0], decoded[1]


def matched_samples(transform: SIMTransform, image: torch.Tensor, box1: ViewBox, box2: ViewBox,
                    geometry: torch.Tensor, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Render both views, read view 2 at its patch centres and view 1 where `geometry` (through sincos_relative,
    decoded, then moved by `shift` patches) puts them; (view 1 samples, view 2 samples) [C, k] for the k patches
    at least MARGIN inside view 1."""
    size, grid = transform.image_size, transform.masks.height
    patch = size / grid
    view1, view2 = transform.render(image, box1), transform.render(image, box2)
    embedding = sincos_relative(DIM, grid, geometry[None])[0]
    y, x = decode_positions(embedding, DIM)
    y, x = y + shift, x + shift
    inside = ((y >= -0.5 + MARGIN) & (y <= grid - 0.5 - MARGIN) & (x >= -0.5 + MARGIN) & (x <= grid - 0.5 - MARGIN))
    rows, cols = patch_grid(grid)
    at2 = sample(view2, (rows[inside] + 0.5) * patch, (cols[inside] + 0.5) * patch)
    at1 = sample(view1, (y[inside] + 0.5) * patch, (x[inside] + 0.5) * patch)
    return at1, at2


def random_box(image: torch.Tensor, flip: bool) -> ViewBox:
    return ViewBox(flip, *v2.RandomResizedCrop.get_params(image, CROP_SCALE, CROP_RATIO))


def view_pairs(image: torch.Tensor, per_flip: int, seed: int) -> list[tuple[ViewBox, ViewBox]]:
    """`per_flip` random box pairs for each of the four flip combinations, plus hand-made ones on the 300 x 400
    coordinate image: identical, mirrored onto each other, zoomed, offset and non-square."""
    torch.manual_seed(seed)
    pairs = [(random_box(image, f1), random_box(image, f2)) for f1, f2 in FLIPS for _ in range(per_flip)]
    if image.shape[-2:] == (SOURCE_HEIGHT, SOURCE_WIDTH):
        for f1, f2 in FLIPS:
            pairs += [
                (ViewBox(f1, 20, 100, 200, 200), ViewBox(f2, 20, 100, 200, 200)),  # same box; centred, so the
                # mirrored boxes (one flip) cover the same source region, mirrored: x = G - 1 - c
                (ViewBox(f1, 0, 0, 300, 400), ViewBox(f2, 75, 100, 150, 200)),  # view 2 = view 1's centre, x 2
                (ViewBox(f1, 30, 50, 240, 180), ViewBox(f2, 60, 140, 120, 160)),
                (ViewBox(f1, 10, 200, 150, 190), ViewBox(f2, 50, 100, 200, 150)),
            ]
    return pairs


def wrong_geometries(box1: ViewBox, box2: ViewBox, image_width: int) -> dict[str, torch.Tensor]:
    """Plausible slips in the geometry convention, each wrong for some flip combination."""
    right = relative_geometry(box1, box2, image_width)
    either = right.clone()
    either[4] = float(box1.flip or box2.flip)  # "flipped" when either view is: wrong for (T, T)
    ignored = right.clone()
    ignored[4] = 0.0  # flips ignored: wrong whenever exactly one view is flipped
    plain_offset = right.clone()
    plain_offset[5] = right[1]  # dj where the mirrored formula needs dj_flip
    return {"flip_if_either": either, "flips_ignored": ignored, "dj_for_dj_flip": plain_offset,
            "half_patch_off": right}


WRONG_FOR = {"flip_if_either": [(True, True)], "flips_ignored": [(False, True), (True, False)],
             "dj_for_dj_flip": [(False, True), (True, False)], "half_patch_off": FLIPS}
SHIFT = {"half_patch_off": 0.5}  # patch corners for centres: the right geometry, positions off by half a patch


# ----------------------------------------------------------------- 1. geometry against pixels


@pytest.mark.parametrize(("size", "grid", "min_per_flip"), [(224, 14, 1000), (96, 6, 150)])
def test_relative_geometry_maps_each_view2_patch_onto_the_same_source_point_in_view1(
        size: int, grid: int, min_per_flip: int) -> None:
    image = coordinate_image()
    transform = SIMTransform(image_size=size, grid_size=grid, num_masked=grid * grid // 2, min_num_patches=4)
    checked = dict.fromkeys(FLIPS, 0)
    worst = dict.fromkeys(FLIPS, 0.0)
    for box1, box2 in view_pairs(image, per_flip=12, seed=grid):
        geometry = relative_geometry(box1, box2, SOURCE_WIDTH)
        assert geometry.dtype == torch.float64 and geometry.shape == (6,)
        # three routes to the positions agree: pixel geometry, the documented formula on relative_geometry, and
        # what sincos_relative encodes (its (y, x) channels are exactly the sin-cos of those positions)
        y_px, x_px = positions_from_boxes(box1, box2, SOURCE_WIDTH, grid)
        y, x = positions_from_geometry(geometry, grid)
        torch.testing.assert_close(y, y_px, rtol=0, atol=1e-9)
        torch.testing.assert_close(x, x_px, rtol=0, atol=1e-9)
        embedding = sincos_relative(DIM, grid, geometry[None])[0]
        assert embedding.shape == (grid * grid, 2 * DIM) and embedding.dtype == torch.float32
        torch.testing.assert_close(embedding[:, :DIM].double(), encode_positions(DIM, y, x), rtol=0, atol=1e-6)
        y_dec, x_dec = decode_positions(embedding, DIM)
        torch.testing.assert_close(y_dec, y, rtol=0, atol=1e-4)
        torch.testing.assert_close(x_dec, x, rtol=0, atol=1e-4)
        # and the pixels agree: view 1 at the encoded position shows the source point view 2's patch centre shows
        at1, at2 = matched_samples(transform, image, box1, box2, geometry)
        flips = (box1.flip, box2.flip)
        checked[flips] += at1.shape[1]
        if at1.shape[1]:
            worst[flips] = max(worst[flips], (at1 - at2).abs().max().item())
    assert all(count >= min_per_flip for count in checked.values()), checked
    assert all(error <= PIXEL_TOL for error in worst.values()), worst


@pytest.mark.parametrize("slip", sorted(WRONG_FOR))
def test_a_wrong_geometry_convention_fails_the_pixel_check(slip: str) -> None:
    """The check above has teeth: each slip sends most checked patches of the flip combinations it gets wrong to
    another source point, while it changes nothing for the others (where it coincides with the right rule); so
    does reading view 1 half a patch off."""
    image = coordinate_image()
    transform = SIMTransform(image_size=224, grid_size=14, num_masked=98)
    checked = dict.fromkeys(FLIPS, 0)
    matching = dict.fromkeys(FLIPS, 0)
    for box1, box2 in view_pairs(image, per_flip=12, seed=14):
        wrong = wrong_geometries(box1, box2, SOURCE_WIDTH)[slip]
        at1, at2 = matched_samples(transform, image, box1, box2, wrong, SHIFT.get(slip, 0.0))
        flips = (box1.flip, box2.flip)
        checked[flips] += at1.shape[1]
        matching[flips] += int(((at1 - at2).abs().amax(dim=0) <= PIXEL_TOL).sum())
    for flips in FLIPS:
        if flips in WRONG_FOR[slip]:
            assert checked[flips] >= 100, (flips, checked)
            assert matching[flips] <= 0.1 * checked[flips], (flips, matching, checked)
        else:
            assert checked[flips] >= 100 and matching[flips] == checked[flips], (flips, matching, checked)


def jpeg_tensor(path: Path) -> torch.Tensor:
    """[3, H, W'] float32 in [0, 1], cut to a non-square width so that the image width W matters."""
    with Image.open(path) as image:
        pixels = TF.to_dtype(TF.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True)
    return pixels[:, :, : pixels.shape[-1] * 7 // 8]


@pytest.mark.parametrize("flips", FLIPS, ids=lambda f: f"flip1={f[0]}-flip2={f[1]}")
def test_real_jpeg_views_show_the_same_pixels_at_matched_positions(flips: tuple[bool, bool]) -> None:
    """On photographs the two views resample the image at different scales, so matched pixels agree only up to
    interpolation; they agree far better than under a flip slip."""
    transform = SIMTransform(image_size=96, grid_size=6, num_masked=18, min_num_patches=4)
    right, slipped, count = [], [], 0
    torch.manual_seed(7)
    for path in JPEGS[:: len(JPEGS) // 10][:10]:
        image = jpeg_tensor(path)
        width = image.shape[-1]
        for _ in range(4):
            box1, box2 = random_box(image, flips[0]), random_box(image, flips[1])
            at1, at2 = matched_samples(transform, image, box1, box2, relative_geometry(box1, box2, width))
            right.append((at1 - at2).abs().flatten())
            count += at1.shape[1]
            slip = wrong_geometries(box1, box2, width)["flips_ignored" if flips[0] != flips[1] else "flip_if_either"]
            if flips != (False, False):
                at1, at2 = matched_samples(transform, image, box1, box2, slip)
                slipped.append((at1 - at2).abs().flatten())
    errors = torch.cat(right)
    assert count >= 300
    assert errors.mean() < 0.02 and errors.quantile(0.99) < 0.15, (errors.mean(), errors.quantile(0.99))
    if flips != (False, False):
        assert torch.cat(slipped).mean() > 10 * errors.mean()


# ----------------------------------------------------------------- 2. identical views


@pytest.mark.parametrize(("dim", "grid"), [(64, 6), (768, 14)])
def test_identical_views_encode_view1s_own_table_and_unit_scales(dim: int, grid: int) -> None:
    geometry = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.3], [0.0, 0.0, 1.0, 1.0, 0.0, -2.5]], dtype=torch.float64)
    embedding = sincos_relative(dim, grid, geometry)
    assert embedding.shape == (2, grid * grid, 2 * dim)
    table = sincos_2d(dim, grid, cls_token=False, rows_first=True)
    assert torch.equal(embedding[0, :, :dim], table) and torch.equal(embedding[1, :, :dim], table)
    quarter = dim // 4
    unit = torch.cat([torch.zeros(quarter), torch.ones(quarter), torch.zeros(quarter), torch.ones(quarter)])
    assert torch.equal(embedding[:, :, dim:], unit.expand(2, grid * grid, dim))


def test_sincos_2d_rows_first_puts_the_row_in_the_first_half() -> None:
    rows, cols = patch_grid(5)
    torch.testing.assert_close(sincos_2d(32, 5, cls_token=False, rows_first=True).double(),
                               encode_positions(32, rows, cols), rtol=0, atol=1e-7)


@pytest.mark.parametrize("flip", [False, True])
def test_relative_geometry_of_a_box_with_itself(flip: bool) -> None:
    box = ViewBox(flip, 13, 37, 120, 90)
    geometry = relative_geometry(box, box, SOURCE_WIDTH)
    assert geometry.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, (SOURCE_WIDTH - 2 * 37) / 90]


def test_relative_geometry_values_and_flip_xor() -> None:
    box1, box2 = ViewBox(True, 10, 20, 100, 80), ViewBox(False, 60, 50, 50, 120)
    expected = [50 / 100, 30 / 80, 50 / 100, 120 / 80, 1.0, (400 - 20 - 50) / 80]
    assert relative_geometry(box1, box2, 400).tolist() == expected
    assert relative_geometry(box1._replace(flip=False), box2._replace(flip=True), 400).tolist() == expected
    assert relative_geometry(box1, box2._replace(flip=True), 400)[4].item() == 0.0


# ----------------------------------------------------------------- 3. the transform on a real image


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(JPEGS[3]) as image:
        return image.convert("RGB")


@pytest.mark.parametrize(("size", "grid", "num_masked"), [(96, 6, 22), (224, 14, 118)])
def test_transform_outputs_two_views_an_exact_count_mask_and_float64_geometry(
        photo: Image.Image, size: int, grid: int, num_masked: int) -> None:
    transform = SIMTransform(size, grid, num_masked)
    for seed in range(4):
        torch.manual_seed(seed)
        out = transform(photo)
        assert set(out) == {"view1", "view2", "mask", "geometry"}
        for key in ("view1", "view2"):
            assert out[key].shape == (3, size, size) and out[key].dtype == torch.float32
        assert out["mask"].shape == (grid * grid,) and out["mask"].dtype == torch.bool
        assert int(out["mask"].sum()) == num_masked
        assert out["geometry"].shape == (6,) and out["geometry"].dtype == torch.float64
        assert not torch.equal(out["view1"], out["view2"])


def test_transform_is_determined_by_the_torch_seed(photo: Image.Image) -> None:
    transform = SIMTransform(96, 6, 22)
    outputs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outputs.append(transform(photo))
    assert all(torch.equal(outputs[0][key], outputs[1][key]) for key in outputs[0])
    assert not torch.equal(outputs[0]["view1"], outputs[2]["view1"])


def test_transform_draws_flips_then_boxes_and_reports_their_geometry(photo: Image.Image) -> None:
    """Replaying the documented draw order (flip 1, flip 2, box 1, box 2) from the same seed reproduces the
    geometry; over many seeds all four flip combinations occur and the flag is their XOR."""
    transform = SIMTransform(96, 6, 22)
    seen = set()
    for seed in range(24):
        torch.manual_seed(seed)
        geometry = transform(photo)["geometry"]
        torch.manual_seed(seed)
        flips = [torch.rand(1).item() < 0.5 for _ in range(2)]
        boxes = [ViewBox(flip, *v2.RandomResizedCrop.get_params(photo, CROP_SCALE, CROP_RATIO)) for flip in flips]
        seen.add(tuple(flips))
        assert geometry[4].item() == float(flips[0] != flips[1])
        assert torch.equal(geometry, relative_geometry(boxes[0], boxes[1], photo.width))
    assert seen == set(FLIPS)


def test_render_treats_pil_images_and_tensors_alike(photo: Image.Image) -> None:
    transform = SIMTransform(96, 6, 22)
    box = ViewBox(True, 10, 20, 60, 80)
    from_pil = TF.pil_to_tensor(transform.render(photo, box)).float()
    from_tensor = transform.render(TF.pil_to_tensor(photo).float(), box)
    assert from_tensor.shape == from_pil.shape == (3, 96, 96)
    assert (from_pil - from_tensor.clamp(0, 255)).abs().mean() < 1.0  # PIL's and torch's bicubic, in uint8
    mirrored = transform.render(TF.pil_to_tensor(photo).float(), box._replace(flip=False))
    assert (from_pil - mirrored.clamp(0, 255)).abs().mean() > 20.0  # the flip is applied


# ----------------------------------------------------------------- 4. the UniGrad loss and target correlation


def released_unigrad(pred: torch.Tensor, target: torch.Tensor, neg_weight: float) -> dict[str, torch.Tensor]:
    """SIM's compute_unigrad_loss, with its n x n matrix (one process: C = T^T T / n)."""
    dim = pred.shape[-1]
    pos = ((pred - target) ** 2).sum(-1).mean()
    correlation = target.T @ target / target.shape[0]
    neg = torch.diagonal(pred @ correlation @ pred.T).mean()
    return {"loss": (pos + neg_weight * neg) / dim, "pos": pos / dim, "neg": neg / dim}


@pytest.mark.parametrize("neg_weight", [0.02, 1.0])
def test_unigrad_loss_and_gradient_match_the_released_n_by_n_computation(neg_weight: float) -> None:
    generator = torch.Generator().manual_seed(0)
    n, dim = 37, 24
    target = F.layer_norm(torch.randn(n, dim, generator=generator, dtype=torch.float64), (dim,))
    pred = torch.randn(n, dim, generator=generator, dtype=torch.float64).requires_grad_()
    reference_pred = pred.detach().clone().requires_grad_()
    correlation = target.T @ target / n
    ours = unigrad_loss(pred, target, correlation, neg_weight)
    reference = released_unigrad(reference_pred, target, neg_weight)
    for key in ("loss", "pos", "neg"):
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-12, atol=0)
    assert not ours["pos"].requires_grad and not ours["neg"].requires_grad
    ours["loss"].backward()
    reference["loss"].backward()
    torch.testing.assert_close(pred.grad, reference_pred.grad, rtol=1e-12, atol=1e-15)
    closed_form = 2 / (dim * n) * ((pred - target) + neg_weight * pred @ correlation)  # methods.md 5.3
    torch.testing.assert_close(pred.grad, closed_form.detach(), rtol=1e-12, atol=1e-15)


def test_batch_correlation_is_the_targets_second_moment() -> None:
    targets = torch.randn(19, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    correlation = TargetCorrelation("batch", 0.99)
    for _ in range(2):
        torch.testing.assert_close(correlation(targets), targets.T @ targets / 19, rtol=1e-14, atol=0)
        correlation.commit()
    assert correlation.ema is None


def test_ema_correlation_starts_from_the_first_batch_and_folds_each_steps_mean_once() -> None:
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randn(11, 5, generator=generator, dtype=torch.float64) for _ in range(4)]
    c = [t.T @ t / 11 for t in batches]
    rho = 0.9
    correlation = TargetCorrelation("ema", rho)

    def close(a: torch.Tensor, b: torch.Tensor) -> None:
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)

    close(correlation(batches[0]), c[0])  # step 0: no EMA yet, the batch's own
    correlation.commit()
    close(correlation.ema, c[0])  # F starts as the first C_batch
    close(correlation(batches[1]), rho * c[0] + (1 - rho) * c[1])  # step 1, micro-batch 1
    close(correlation(batches[2]), rho * c[0] + (1 - rho) * c[2])  # micro-batch 2: F not yet updated
    correlation.commit()
    ema = rho * c[0] + (1 - rho) * (c[1] + c[2]) / 2
    close(correlation.ema, ema)  # one fold per step, of the micro-batches' mean
    correlation.commit()  # nothing pending: no change
    close(correlation.ema, ema)
    close(correlation(batches[3]), rho * ema + (1 - rho) * c[3])


# ----------------------------------------------------------------- 5. token batch norm, one process


def paired_norms(channels: int) -> tuple[TokenSyncBatchNorm, torch.nn.BatchNorm1d]:
    generator = torch.Generator().manual_seed(3)
    ours, reference = TokenSyncBatchNorm(channels), torch.nn.BatchNorm1d(channels, dtype=torch.float64)
    with torch.no_grad():
        ours.weight.copy_(1 + 0.5 * torch.randn(channels, generator=generator))
        ours.bias.copy_(torch.randn(channels, generator=generator))
        reference.weight.copy_(ours.weight)
        reference.bias.copy_(ours.bias)
    return ours, reference


def token_batches(count: int, shape: tuple[int, int, int], seed: int = 4) -> list[torch.Tensor]:
    """Tokens [B, L, C] with per-channel offsets and scales far from (0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    offsets = 3 * torch.randn(shape[-1], generator=generator)
    scales = torch.rand(shape[-1], generator=generator) * 4 + 0.5
    return [torch.randn(shape, generator=generator) * scales + offsets for _ in range(count)]


def test_token_batch_norm_equals_batchnorm1d_over_permuted_tokens() -> None:
    """Train mode: outputs, input and parameter gradients, running statistics after several updates; then eval
    mode. The reference runs in float64, ours in fp32."""
    ours, reference = paired_norms(8)
    batches = token_batches(3, (3, 7, 8))
    mix = torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(5))
    for x in batches:
        x_ours = x.clone().requires_grad_()
        x_ref = x.double().requires_grad_()
        out = ours(x_ours)
        out_ref = reference(x_ref.permute(0, 2, 1)).permute(0, 2, 1)
        assert out.dtype == torch.float32 and out.shape == x.shape
        torch.testing.assert_close(out.double(), out_ref, rtol=0, atol=2e-6)
        ours.zero_grad()
        reference.zero_grad()
        (out * mix).sum().backward()
        (out_ref * mix.double()).sum().backward()
        torch.testing.assert_close(x_ours.grad.double(), x_ref.grad, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(ours.weight.grad.double(), reference.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.bias.grad.double(), reference.bias.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.running_mean.double(), reference.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.running_var.double(), reference.running_var, rtol=1e-6, atol=1e-6)
    assert ours.running_mean.dtype == ours.running_var.dtype == torch.float32
    assert not torch.allclose(ours.running_var, torch.ones(8))  # the updates happened
    ours.eval()
    reference.eval()
    x = token_batches(1, (2, 5, 8), seed=6)[0]
    out = ours(x)
    torch.testing.assert_close(out.double(), reference(x.double().permute(0, 2, 1)).permute(0, 2, 1),
                               rtol=0, atol=2e-6)


def test_token_batch_norm_returns_bfloat16_for_bfloat16_input_computed_in_fp32() -> None:
    ours, reference = paired_norms(8)
    twin = copy.deepcopy(ours)
    x = token_batches(1, (3, 7, 8))[0] + 20  # offsets where bf16 statistics would be far off
    x_bf16 = x.bfloat16().requires_grad_()
    x_fp32 = x_bf16.detach().float().requires_grad_()  # the bf16-rounded input, in fp32
    mix = torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(5)).bfloat16()
    out = ours(x_bf16)
    out_fp32 = twin(x_fp32)
    assert out.dtype == torch.bfloat16 and out_fp32.dtype == torch.float32
    assert torch.equal(out, out_fp32.bfloat16())  # the fp32 result, rounded once
    out_ref = reference(x_bf16.detach().double().permute(0, 2, 1)).permute(0, 2, 1)
    assert ((out.double() - out_ref).abs() <= out_ref.abs() * 2**-8 + 1e-6).all()  # one bf16 rounding away
    (out * mix).sum().backward()
    (out_fp32 * mix.float()).sum().backward()
    assert x_bf16.grad.dtype == torch.bfloat16
    assert torch.equal(x_bf16.grad, x_fp32.grad.bfloat16())
    assert torch.equal(ours.weight.grad, twin.weight.grad) and torch.equal(ours.bias.grad, twin.bias.grad)
    assert ours.running_mean.dtype == torch.float32
    assert torch.equal(ours.running_mean, twin.running_mean) and torch.equal(ours.running_var, twin.running_var)


# ----------------------------------------------------------------- 6. two processes


def two_rank_reports(tmp_path: Path) -> list[dict]:
    """The worker's report from each of two ranks under torchrun."""
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "sim_sync_worker.py"), str(out)]
    result = subprocess.run(cmd, cwd=tmp_path, env=child_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and len(report["ranks"]) == 2
    return report["ranks"]


def test_two_ranks_with_synchronised_statistics_compute_what_one_process_computes_on_the_global_batch(
        tmp_path: Path) -> None:
    """Each rank's loss is the mean over its equal share, so the rank mean is the one-process loss. Parameter
    gradients, averaged over ranks as DDP and DeepSpeed do, equal the one-process ones; an input's gradient on its
    rank is that of the sum of the rank losses (as with torch's SyncBatchNorm), W times the one-process gradient
    of the mean, which the averaging of the parameters upstream divides out again (the embedding's gradient)."""
    ranks = two_rank_reports(tmp_path)
    assert not torch.distributed.is_initialized()
    single = sim_sync_worker.report(0, 1)  # the same code, in this process: no process group
    world = len(ranks)

    def t(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64)

    def stacked(key: str) -> torch.Tensor:
        return torch.cat([t(rank[key]) for rank in ranks])

    def averaged(key: str) -> torch.Tensor:
        return torch.stack([t(rank[key]) for rank in ranks]).mean(dim=0)

    def fp32_close(a: torch.Tensor, b: torch.Tensor) -> None:  # the batch norm computes in fp32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    def fp64_close(a: torch.Tensor, b: torch.Tensor) -> None:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)

    # the shares differ, so per-rank statistics would not do
    assert (t(ranks[0]["local_mean"]) - t(ranks[1]["local_mean"])).abs().max() > 0.5
    fp32_close(stacked("bn_out"), t(single["bn_out"]))
    fp32_close(averaged("bn_loss"), t(single["bn_loss"]))
    fp32_close(stacked("input_grad"), world * t(single["input_grad"]))
    for key in ("embed_weight_grad", "embed_bias_grad", "bn_weight_grad", "bn_bias_grad"):
        fp32_close(averaged(key), t(single[key]))
    for rank in ranks:
        for key in ("running_mean", "running_var"):
            fp32_close(t(rank[key]), t(single[key]))
    fp32_close(stacked("eval_out"), t(single["eval_out"]))

    for rank in ranks:
        fp64_close(t(rank["correlation"]), t(single["correlation"]))
    for key in ("loss", "pos", "neg"):
        fp64_close(averaged(key), t(single[key]))
    fp64_close(stacked("pred_grad"), world * t(single["pred_grad"]))
