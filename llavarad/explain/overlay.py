"""A relevance grid drawn over the X-ray it explains, in the original image's geometry.

The model saw a size x size center crop of the image resized to a shorter side of `size`
(`images.preprocess`). A patch grid (g, g) covers that crop, so it is upsampled to the crop's
box in original pixels and placed there; the parts the crop cut off get no colour, and a thin
outline marks what the model saw.
"""

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from llavarad.infer.images import resize_and_crop

# Matplotlib's "inferno" at five stops: dark (low) to light yellow (high), readable in grey print.
_STOPS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
MAX_SIDE = 1024  # overlays are drawn at most this many pixels on their longer side
OPACITY = 0.6  # the colour's weight where relevance is highest; zero relevance leaves the X-ray as it is


def crop_box(w: int, h: int, size: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in a w x h image's pixels of the crop the model saw."""
    new_w, new_h, left, top = resize_and_crop(w, h, size)
    sx, sy = w / new_w, h / new_h  # the resize maps pixel edges linearly
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def grid_to_image(grid: np.ndarray, w: int, h: int, size: int, out_w: int | None = None, out_h: int | None = None) -> np.ndarray:
    """A (g, g) grid over the crop -> an (out_h, out_w) map over the whole image (default w x h),
    bilinear inside the crop box, zero outside it."""
    out_w, out_h = out_w or w, out_h or h
    left, top, right, bottom = crop_box(w, h, size)
    sx, sy = out_w / w, out_h / h
    x0, y0, x1, y1 = (round(v) for v in (left * sx, top * sy, right * sx, bottom * sy))
    patch = Image.fromarray(grid.astype(np.float32), mode="F").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    out = np.zeros((out_h, out_w), np.float32)
    out[y0:y1, x0:x1] = np.asarray(patch)[: out_h - y0, : out_w - x0]
    return out


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (...) -> RGB float32 (..., 3) on the inferno scale."""
    x = np.clip(values, 0, 1) * (len(_STOPS) - 1)
    i = np.minimum(x.astype(int), len(_STOPS) - 2)
    frac = (x - i)[..., None]
    return _STOPS[i] * (1 - frac) + _STOPS[i + 1] * frac


def drawn_size(w: int, h: int) -> tuple[float, int, int]:
    """(scale, out_w, out_h): a w x h image as overlays draw it, at most MAX_SIDE on its longer side."""
    scale = min(1.0, MAX_SIDE / max(w, h))
    return scale, max(1, round(w * scale)), max(1, round(h * scale))


def _heat(grid: np.ndarray, w: int, h: int, size: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(scale, heat (H, W, 1) in [0, 1], its colour (H, W, 3)): `grid` (g, g)'s positive part scaled
    to its maximum, over a w x h image at drawn_size()."""
    scale, out_w, out_h = drawn_size(w, h)
    positive = np.maximum(grid, 0)
    peak = positive.max()
    heat = grid_to_image(positive / peak if peak > 0 else positive, w, h, size, out_w, out_h)
    return scale, heat[..., None], colorize(heat)


def layer(grid: np.ndarray, w: int, h: int, size: int) -> Image.Image:
    """The map alone (RGBA, no caption), at the size render() draws the X-ray: the colour, with alpha
    OPACITY x heat, so that laid over the picture (the server's page does) it blends as render() does."""
    _, heat, colour = _heat(grid, w, h, size)
    return Image.fromarray(np.uint8(np.clip(np.concatenate([colour, 255 * OPACITY * heat], axis=-1), 0, 255)), "RGBA")


def render(image: Image.Image, grid: np.ndarray, caption: str, size: int) -> Image.Image:
    """The X-ray with `grid` (g, g) blended in (its positive part, scaled to its maximum), the crop
    outlined, a colour scale on the right and the caption below."""
    w, h = image.size
    scale, heat, colour = _heat(grid, w, h, size)
    out_h, out_w = heat.shape[:2]
    base = np.asarray(image.convert("L").resize((out_w, out_h), Image.Resampling.BILINEAR), np.float32)[..., None]
    alpha = OPACITY * heat
    blended = Image.fromarray(np.uint8(np.clip(base * (1 - alpha) + colour * alpha, 0, 255)))

    font = ImageFont.load_default(size=max(12, out_w // 50))
    line_h = font.getbbox("Ag")[3] + 4
    lines = textwrap.wrap(caption, width=max(20, int(out_w / (0.55 * font.size)))) or [""]
    bar_w = max(12, out_w // 40)
    label_w = int(font.getlength("high")) + 8
    canvas = Image.new("RGB", (out_w + bar_w + label_w + 12, out_h + line_h * len(lines) + 8), "white")
    canvas.paste(blended, (0, 0))
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = (v * scale for v in crop_box(w, h, size))
    draw.rectangle((left, top, right - 1, bottom - 1), outline=(80, 160, 255))
    ramp = colorize(np.linspace(1, 0, out_h, dtype=np.float32))  # top = high
    canvas.paste(Image.fromarray(np.uint8(np.repeat(ramp[:, None], bar_w, axis=1))), (out_w + 4, 0))
    draw.text((out_w + bar_w + 8, 0), "high", fill="black", font=font)
    draw.text((out_w + bar_w + 8, out_h - line_h), "0", fill="black", font=font)
    for n, line in enumerate(lines):
        draw.text((4, out_h + 4 + n * line_h), line, fill="black", font=font)
    return canvas
