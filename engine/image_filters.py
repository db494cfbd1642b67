"""Image filters on channel-first tensors [B, C, H, W], in plain torch: ComfyUI's Gaussian
blur and sharpen kernels, flat-kernel morphology, Canny edges and the YCbCr colour space.

Morphology, Canny and YCbCr give what ComfyUI 0.8 computes with kornia 0.8 (the library its
nodes call), written here so Loom needs no extra dependency for a few dozen lines of maths;
tests compare them with kornia where it is installed."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights and kornia's YCbCr chroma scales (with a 0.5 offset).
LUMA = (0.299, 0.587, 0.114)
CB_SCALE, CR_SCALE = 0.564, 0.713
R_FROM_CR, G_FROM_CR, G_FROM_CB, B_FROM_CB = 1.403, 0.714, 0.344, 1.773
CANNY_BLUR_SIZE, CANNY_BLUR_SIGMA = 5, 1.0  # kornia.filters.canny's defaults
CANNY_EPS = 1e-6
# Neighbour offsets (dy, dx) for the eight gradient directions k * 45 degrees, k = 0..7.
DIRECTIONS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))


def comfy_gaussian_kernel(size: int, sigma: float, device: torch.device | None = None
                          ) -> torch.Tensor:
    """ComfyUI's blur kernel [size, size]: exp(-d^2 / 2 sigma^2) with d the distance on a
    grid spanning -1..1 (not pixels), normalised to sum 1."""
    axis = torch.linspace(-1, 1, size, device=device)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    weights = torch.exp(-(rows * rows + cols * cols) / (2.0 * sigma * sigma))
    return weights / weights.sum()


def filter_reflect(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Each channel correlated with the odd square `kernel`, borders reflected."""
    channels, radius = images.shape[1], kernel.shape[-1] // 2
    if radius >= min(images.shape[-2:]):
        raise ValueError(f"a {kernel.shape[-1]}x{kernel.shape[-1]} filter needs an image "
                         f"larger than {radius} pixels on each side, got "
                         f"{images.shape[-1]}x{images.shape[-2]}; lower the radius")
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    weights = kernel.to(images.dtype).expand(channels, 1, *kernel.shape)
    return F.conv2d(padded, weights, groups=channels)


def gaussian_blur(images: torch.Tensor, radius: int, sigma: float) -> torch.Tensor:
    """ComfyUI's ImageBlur: a (2r+1)-wide ComfyUI Gaussian, borders reflected."""
    return filter_reflect(images, comfy_gaussian_kernel(radius * 2 + 1, sigma, images.device))


def sharpen(images: torch.Tensor, radius: int, sigma: float, alpha: float) -> torch.Tensor:
    """Unsharp kernel: -10 alpha times the Gaussian, centre raised so the kernel sums to 1."""
    kernel = comfy_gaussian_kernel(radius * 2 + 1, sigma, images.device) * -(alpha * 10)
    kernel[radius, radius] += 1.0 - kernel.sum()
    return filter_reflect(images, kernel)


def _flat_window(images: torch.Tensor, size: int, pad_value: float) -> torch.Tensor:
    """Pad so a size x size window has its origin at (size // 2, size // 2), as kornia does."""
    before, after = size // 2, size - size // 2 - 1
    return F.pad(images, (before, after, before, after), value=pad_value)


def dilate(images: torch.Tensor, size: int) -> torch.Tensor:
    """Max over a size x size window; outside the image is ignored (kornia's geodesic border)."""
    return F.max_pool2d(_flat_window(images, size, -math.inf), size, stride=1)


def erode(images: torch.Tensor, size: int) -> torch.Tensor:
    """Min over a size x size window; outside the image is ignored."""
    return -F.max_pool2d(_flat_window(-images, size, -math.inf), size, stride=1)


def morphology(images: torch.Tensor, operation: str, size: int) -> torch.Tensor:
    """One of ComfyUI's Morphology operations with a flat size x size kernel."""
    if operation == "erode":
        return erode(images, size)
    if operation == "dilate":
        return dilate(images, size)
    if operation == "open":
        return dilate(erode(images, size), size)
    if operation == "close":
        return erode(dilate(images, size), size)
    if operation == "gradient":
        return dilate(images, size) - erode(images, size)
    if operation == "top_hat":
        return images - dilate(erode(images, size), size)
    if operation == "bottom_hat":
        return erode(dilate(images, size), size) - images
    raise ValueError(f"unknown morphology operation {operation!r}; use one of erode, dilate, "
                     f"open, close, gradient, top_hat, bottom_hat")


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """Y of channels 0..2 [B, 3, H, W] -> [B, 1, H, W]."""
    red, green, blue = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
    return LUMA[0] * red + LUMA[1] * green + LUMA[2] * blue


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB -> Y, Cb, Cr with chroma centred on 0.5."""
    y = luma(rgb)
    cb = (rgb[:, 2:3] - y) * CB_SCALE + 0.5
    cr = (rgb[:, 0:1] - y) * CR_SCALE + 0.5
    return torch.cat((y, cb, cr), dim=1)


def ycbcr_to_rgb(ycbcr: torch.Tensor) -> torch.Tensor:
    """The inverse of rgb_to_ycbcr, clamped to 0..1."""
    y, cb, cr = ycbcr[:, 0:1], ycbcr[:, 1:2] - 0.5, ycbcr[:, 2:3] - 0.5
    red = y + R_FROM_CR * cr
    green = y - G_FROM_CR * cr - G_FROM_CB * cb
    blue = y + B_FROM_CB * cb
    return torch.cat((red, green, blue), dim=1).clamp(0, 1)


def _separable_gaussian(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """kornia's 1-D Gaussian: taps at pixel offsets -size//2 .. size//2, normalised."""
    offsets = torch.arange(size, device=device, dtype=torch.float32) - size // 2
    taps = torch.exp(-offsets.pow(2) / (2 * sigma * sigma))
    return taps / taps.sum()


def _sobel(grey: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised Sobel gradients (x to the right, y downwards), borders replicated."""
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]],
                           device=grey.device, dtype=grey.dtype)
    kernels = torch.stack((sobel_x, sobel_x.t()))[:, None]  # (2, 1, 3, 3)
    gradients = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    return gradients[:, 0:1], gradients[:, 1:2]


def _neighbour(values: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """values shifted so each pixel sees its (dy, dx) neighbour; zeros outside."""
    height, width = values.shape[-2:]
    padded = F.pad(values, (1, 1, 1, 1))
    return padded[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]


def _non_maximum(magnitude: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Keep pixels strictly above both neighbours along the gradient (rounded to 45 deg)."""
    octant = torch.round(angle * (4 / math.pi))
    forward, backward = (octant % 8).long(), ((octant + 4) % 8).long()
    drops = torch.stack([magnitude - _neighbour(magnitude, dy, dx) for dy, dx in DIRECTIONS])
    ahead = torch.gather(drops, 0, forward[None])[0]
    behind = torch.gather(drops, 0, backward[None])[0]
    return magnitude * (torch.minimum(ahead, behind) > 0)


def _hysteresis(edges: torch.Tensor) -> torch.Tensor:
    """Grow strong edges (1) into 8-connected weak ones (0.5) until nothing changes; drop the
    weak pixels left over."""
    strong, weak = edges == 1, edges == 0.5
    while True:
        grown = F.max_pool2d(strong.float(), 3, stride=1, padding=1) > 0
        reached = strong | (weak & grown)
        if torch.equal(reached, strong):
            return strong.to(edges.dtype)
        strong = reached


def canny(images: torch.Tensor, low_threshold: float, high_threshold: float) -> torch.Tensor:
    """Canny edges [B, 1, H, W] of 0/1 from RGB or grey images, as kornia 0.8 computes them:
    luma, 5x5 sigma-1 Gaussian (reflected borders), Sobel magnitude, non-maximum suppression,
    double threshold and hysteresis."""
    if not 0 < low_threshold <= high_threshold < 1:
        raise ValueError(f"Canny thresholds must satisfy 0 < low <= high < 1, got "
                         f"low={low_threshold}, high={high_threshold}")
    grey = luma(images) if images.shape[1] == 3 else images
    taps = _separable_gaussian(CANNY_BLUR_SIZE, CANNY_BLUR_SIGMA, images.device)
    blurred = filter_reflect(grey, taps[:, None] * taps[None, :])
    grad_x, grad_y = _sobel(blurred)
    magnitude = torch.sqrt(grad_x * grad_x + grad_y * grad_y + CANNY_EPS)
    thinned = _non_maximum(magnitude, torch.atan2(grad_y, grad_x))
    edges = (thinned > low_threshold).to(images.dtype) * 0.5 + \
        (thinned > high_threshold).to(images.dtype) * 0.5
    return _hysteresis(edges)
