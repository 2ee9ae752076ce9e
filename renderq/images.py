"""Checking an uploaded photo before anything is stored: a real JPEG, PNG or WebP, not a decompression bomb."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from renderq.errors import InvalidInput, TooLarge

ACCEPTED_FORMATS = {"JPEG": ("image/jpeg", "jpg"), "PNG": ("image/png", "png"), "WEBP": ("image/webp", "webp")}
MAX_PIXELS = 40_000_000  # a 40-megapixel photo; past that it is a decompression bomb, not a photo


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    content_type: str
    extension: str
    width: int
    height: int


def check_image(data: bytes, max_bytes: int) -> CheckedImage:
    if not data:
        raise InvalidInput("INVALID_UPLOAD", "The 'file' field is empty; attach a JPEG, PNG or WebP photo.")
    if len(data) > max_bytes:
        raise TooLarge("PAYLOAD_TOO_LARGE", "The photo is larger than MAX_UPLOAD_BYTES (%d bytes)." % max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                image_format = image.format
                if width * height > MAX_PIXELS:
                    raise Image.DecompressionBombError("too many pixels")
                image.load()  # decodes every byte: a truncated file fails here, not in the worker
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInput("INVALID_UPLOAD", "The image has too many pixels (at most %d)." % MAX_PIXELS) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidInput("INVALID_UPLOAD", "The file is not a readable image; send a JPEG, PNG or WebP photo.") from None
    if image_format not in ACCEPTED_FORMATS:
        raise InvalidInput("INVALID_UPLOAD", "Images in %s are not accepted; send JPEG, PNG or WebP." % image_format)
    content_type, extension = ACCEPTED_FORMATS[image_format]
    return CheckedImage(data, content_type, extension, width, height)
