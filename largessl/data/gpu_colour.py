"""The device half of BYOL's colour augmentation (data/multicrop.py `colour_steps`, used by DINO and SIM) and
PIL's Lanczos resize (CAE's DALL-E tokenizer view), for the GPU input path (data/gpu_decode.py).

`ColourDraw` runs in a DataLoader worker: it makes exactly the random draws the CPU pipeline makes for one view,
in its order and from the same per-sample-seeded torch RNG (RandomApply's coin and, when it applies, ColorJitter's
permutation and four factors; RandomGrayscale's coin; the blur's coin and radius; the solariser's coin), and packs
them into a [PARAMS] float tensor. `apply_colour` then applies a whole batch of views at once on the device, each
view with its own parameters: jitter in the view's own order, greyscale, Gaussian blur, solarise. The CPU pipeline
runs the same operations on 8-bit PIL images (rounding after each step, PIL's box-blur approximation of the
Gaussian, PIL's 8-bit HSV for the hue); here they run in float32 on [0, 1]. The tests bound the difference.

`lanczos_resize` is PIL's separable Lanczos-3 resampling (Resample.c: support 3 x max(scale, 1), the kernel
centred at (i + 0.5) x scale, weights normalised per output pixel, the horizontal pass first, each pass rounded to
8 bits) written as two matrix products, since torchvision has no tensor Lanczos kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf

# ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1) as colour_steps sets it: factor ranges
BRIGHTNESS, CONTRAST, SATURATION, HUE = (0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)
JITTER_P, GRAYSCALE_P, BLUR_RADIUS = 0.8, 0.2, (0.1, 2.0)
# Layout of one view's parameters; a skipped jitter keeps the identity factors (1, 1, 1, 0).
JITTER, ORDER, FACTORS, GREY, BLUR, RADIUS, SOLARIZE = 0, slice(1, 5), slice(5, 9), 9, 10, 11, 12
PARAMS = 13
IDENTITY = (1.0, 1.0, 1.0, 0.0)


def uniform(low: float, high: float) -> float:
    """ColorJitter._generate_value: one torch.empty(1).uniform_ draw."""
    return float(torch.empty(1).uniform_(low, high).item())


class ColourDraw:
    """One view's colour parameters, drawn as colour_steps(blur_p, solarize_p) draws them on the CPU path."""

    def __init__(self, *, blur_p: float, solarize_p: float = 0.0) -> None:
        self.blur_p, self.solarize_p = blur_p, solarize_p

    def __call__(self) -> torch.Tensor:
        params = torch.zeros(PARAMS)
        params[ORDER], params[FACTORS] = torch.arange(4.0), torch.tensor(IDENTITY)
        if torch.rand(1) < JITTER_P:  # v2.RandomApply: skipped when rand >= p
            params[JITTER] = 1.0
            params[ORDER] = torch.randperm(4).float()
            params[FACTORS] = torch.tensor([uniform(*BRIGHTNESS), uniform(*CONTRAST), uniform(*SATURATION),
                                            uniform(*HUE)])
        params[GREY] = float(torch.rand(1) < GRAYSCALE_P)
        apply, unit = torch.rand(2).tolist()  # PILGaussianBlur: both draws always
        params[BLUR] = float(apply < self.blur_p)
        params[RADIUS] = BLUR_RADIUS[0] + (BLUR_RADIUS[1] - BLUR_RADIUS[0]) * unit
        if self.solarize_p > 0:
            params[SOLARIZE] = float(torch.rand(1) < self.solarize_p)
        return params


def per_view(values: torch.Tensor) -> torch.Tensor:
    return values[:, None, None, None]


def grey(images: torch.Tensor) -> torch.Tensor:
    """[V, 1, H, W] luma (ITU-R 601-2, the weights of torchvision's rgb_to_grayscale)."""
    r, g, b = images.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor x image + (1 - factor) x other, clamped to [0, 1] (ImageEnhance's blend)."""
    factor = per_view(factor)
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """[V, 3, H, W] RGB in [0, 1] -> HSV, hue in [0, 1) (the hexcone model PIL and torchvision use)."""
    r, g, b = images.unbind(1)
    high, low = images.amax(1), images.amin(1)
    spread = high - low
    safe = torch.where(spread > 0, spread, torch.ones_like(spread))
    hue = torch.where(high == r, (g - b) / safe, torch.where(high == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(spread > 0, hue / 6 % 1.0, torch.zeros_like(hue))
    saturation = torch.where(high > 0, spread / torch.where(high > 0, high, torch.ones_like(high)), high * 0)
    return torch.stack([hue, saturation, high], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = hsv.unbind(1)
    sector = hue * 6
    index = sector.floor().long() % 6
    frac = sector - sector.floor()
    p = value * (1 - saturation)
    q = value * (1 - saturation * frac)
    t = value * (1 - saturation * (1 - frac))
    options = torch.stack([value, p, q, t], 1)  # which of v, p, q, t is R, G, B in each of the six sectors
    pick = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=hsv.device)
    return options.gather(1, pick[:, index].movedim(0, 1)).clamp(0, 1)


def shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(images)
    hsv[:, 0] = (hsv[:, 0] + shift[:, None, None]) % 1.0
    return hsv_to_rgb(hsv)


def jitter(images: torch.Tensor, params: torch.Tensor, hue_at: list[bool]) -> torch.Tensor:
    """ColorJitter with each view's own order: at each of the four positions, the operation that view puts there
    (identity factors for the views that put another one there or skip the jitter); `hue_at`: whether any view
    shifts the hue at that position (known on the host, so the device is never asked)."""
    order, factors = params[:, ORDER].long(), params[:, FACTORS]
    for position in range(4):
        chosen = [(order[:, position] == op) & (params[:, JITTER] > 0) for op in range(4)]
        pick = [torch.where(chosen[op], factors[:, op], torch.full_like(factors[:, op], IDENTITY[op]))
                for op in range(4)]
        images = blend(images, torch.zeros_like(images), pick[0])  # brightness: towards black
        images = blend(images, grey(images).mean((1, 2, 3), keepdim=True), pick[1])  # contrast: towards mean grey
        images = blend(images, grey(images), pick[2])  # saturation: towards the view's grey
        if hue_at[position]:
            images = torch.where(per_view(chosen[3]), shift_hue(images, pick[3]), images)
    return images


def gaussian_blur(images: torch.Tensor, radius: torch.Tensor, half: int) -> torch.Tensor:
    """Each view blurred by a Gaussian of standard deviation `radius` (PIL's GaussianBlur radius), separable,
    edges replicated, over 2 x `half` + 1 pixels."""
    views, channels, height, width = images.shape
    offsets = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / radius[:, None].to(images.dtype)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # [V x C, K]
    flat = nnf.pad(images.reshape(1, views * channels, height, width), (half, half, half, half), mode="replicate")
    flat = nnf.conv2d(flat, kernel[:, None, None, :], groups=views * channels)
    flat = nnf.conv2d(flat, kernel[:, None, :, None], groups=views * channels)
    return flat.reshape(views, channels, height, width)


def apply_colour(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """[V, 3, H, W] float in [0, 1] on the device and [V, PARAMS] (ColourDraw) in host memory -> the views after
    jitter, greyscale, blur and solarisation, still in [0, 1] (normalising is the caller's). What only decides
    which operations run (any hue shift at a position, any blur, the kernel width: 3 standard deviations of the
    largest radius each side) is read from the host copy."""
    host, params = params.cpu(), params.to(images.device, non_blocking=True)
    jittered = host[:, JITTER] > 0
    hue_at = [bool(((host[:, ORDER][:, position] == 3) & jittered).any()) for position in range(4)]
    images = jitter(images, params, hue_at)
    images = torch.where(per_view(params[:, GREY] > 0), grey(images).expand_as(images), images)
    if bool((host[:, BLUR] > 0).any()):
        half = math.ceil(3 * float(host[host[:, BLUR] > 0, RADIUS].max()))
        images = torch.where(per_view(params[:, BLUR] > 0), gaussian_blur(images, params[:, RADIUS], half), images)
    solarised = per_view(params[:, SOLARIZE] > 0) & (images >= 128 / 255)  # PIL: pixels >= 128 inverted
    return torch.where(solarised, 1 - images, images)


def lanczos_weights(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """[out, in] PIL's Lanczos-3 resampling matrix (Resample.c precompute_coeffs)."""
    scale = in_size / out_size
    support_scale = max(scale, 1.0)
    centres = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    source = torch.arange(in_size, dtype=torch.float64)
    x = (source[None] - centres[:, None] + 0.5) / support_scale
    weights = torch.sinc(x) * torch.sinc(x / 3) * (x.abs() < 3)
    return (weights / weights.sum(1, keepdim=True)).float().to(device)


def lanczos_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """[3, h, w] uint8 -> [3, size, size] uint8, as PIL's Image.resize((size, size), LANCZOS)."""
    _, height, width = image.shape
    rows = lanczos_weights(height, size, image.device)
    columns = lanczos_weights(width, size, image.device)
    wide = (image.float() @ columns.T).round().clamp(0, 255)  # the horizontal pass, rounded to 8 bits
    return (rows @ wide).round().clamp(0, 255).to(torch.uint8)
