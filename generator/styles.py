"""The Pillow transforms behind each style, plus decoding, prompt-seeded generation and PNG encoding.

Every style returns an RGB image of exactly the input's size: callers check the output size
against the upload, so no style may crop, pad or rotate.
"""
from __future__ import annotations

import hashlib
import io
import random
from typing import Callable

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageOps

# Pillow's default (~89 MP) only warns below twice the limit; we enforce our own hard ceiling so an
# upload that is cheap to send but huge to decode is refused before any pixel is decoded.
MAX_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

GENERATED_SIZE = 512


class InvalidImage(ValueError):
    """The upload is not an image we are willing to decode."""


def _sketch(img: Image.Image) -> Image.Image:
    # Smoothing first keeps sensor noise from turning into speckle; inverting gives dark lines on paper.
    edges = ImageOps.grayscale(img).filter(ImageFilter.SMOOTH_MORE).filter(ImageFilter.FIND_EDGES)
    return ImageOps.autocontrast(ImageOps.invert(edges)).convert("RGB")


def _sepia(img: Image.Image) -> Image.Image:
    return ImageOps.colorize(ImageOps.grayscale(img), black="#2b1d0e", white="#fff4dc", mid="#a67c52")


def _cartoon(img: Image.Image) -> Image.Image:
    flat = ImageOps.posterize(img.filter(ImageFilter.SMOOTH_MORE).filter(ImageFilter.SMOOTH_MORE), 3)
    edges = ImageOps.grayscale(img).filter(ImageFilter.FIND_EDGES)
    # Strong edges become black outlines; everything else multiplies by white and is left alone.
    outline = edges.point(lambda v: 0 if v > 40 else 255).convert("RGB")
    return ImageChops.multiply(flat.filter(ImageFilter.EDGE_ENHANCE), outline)


def _pixelate(img: Image.Image) -> Image.Image:
    # At least 2 so small images visibly change; ~64 blocks across the long side otherwise.
    block = max(2, max(img.size) // 64)
    small = img.resize((max(1, img.width // block), max(1, img.height // block)), Image.Resampling.BOX)
    return small.resize(img.size, Image.Resampling.NEAREST)


def _unfiltered(img: Image.Image) -> Image.Image:
    return img.copy()


STYLES: dict[str, Callable[[Image.Image], Image.Image]] = {
    "sketch": _sketch,
    "sepia": _sepia,
    "cartoon": _cartoon,
    "pixelate": _pixelate,
    "unfiltered": _unfiltered,
}


def apply_style(style: str, img: Image.Image) -> Image.Image:
    """`img` transformed by `style`; KeyError for an unknown style."""
    return STYLES[style](img)


def load_image(data: bytes) -> Image.Image:
    """Decode an upload to RGB, flattening transparency onto white; InvalidImage if it is not usable."""
    try:
        img = Image.open(io.BytesIO(data))
        # open() only reads the header, so this check costs nothing and runs before decoding.
        if img.width * img.height > MAX_PIXELS:
            raise InvalidImage("image too large: %dx%d" % img.size)
        img.load()
    except InvalidImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise InvalidImage(str(exc) or type(exc).__name__) from exc
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, "white")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def generate_base(prompt: str, size: int = GENERATED_SIZE) -> Image.Image:
    """A deterministic square picture seeded by `prompt`: a two-colour gradient with a few shapes."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    rng = random.Random(seed)

    def colour() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    mask = Image.linear_gradient("L").resize((size, size)).rotate(rng.choice((0, 90, 180, 270)))
    img = Image.composite(Image.new("RGB", (size, size), colour()), Image.new("RGB", (size, size), colour()), mask)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(4, 10)):
        x0, y0 = rng.randrange(size), rng.randrange(size)
        x1, y1 = x0 + rng.randint(20, size // 2), y0 + rng.randint(20, size // 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=colour(), outline=(0, 0, 0), width=3)
    return img


def to_png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    # Low compression: these PNGs are thrown away after a test, so speed matters more than size.
    img.save(out, format="PNG", compress_level=1)
    return out.getvalue()
