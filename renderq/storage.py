"""Files under MEDIA_ROOT: uploaded photos and rendered results, stored by relative path."""
from __future__ import annotations

import os
import tempfile


def absolute_path(media_root: str, relative: str) -> str:
    return os.path.join(media_root, relative)


def save(media_root: str, relative: str, data: bytes) -> str:
    """Write atomically, so a reader never sees half a file; returns `relative`."""
    target = absolute_path(media_root, relative)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".partial-")
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.replace(temporary, target)
    return relative


def read(media_root: str, relative: str) -> bytes:
    with open(absolute_path(media_root, relative), "rb") as handle:
        return handle.read()


def delete(media_root: str, relative: str | None) -> None:
    if relative:
        try:
            os.remove(absolute_path(media_root, relative))
        except FileNotFoundError:
            pass
