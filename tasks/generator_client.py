"""HTTP client for the image generator (SPEC §8): one call per attempt, PNG bytes or a classified failure."""
from __future__ import annotations

import os
from typing import Optional

import requests

from config import Settings
from config.kinds import get_kind
from tasks.errors import classify_response

_session = requests.Session()


def _call(settings: Settings, job_id: str, kind: str, params: dict, safety_agreed: bool,
          image_path: Optional[str]) -> bytes:
    fields = {
        "kind": kind,
        "style": params.get("style") or "",
        "prompt": params.get("prompt") or "",
        "safety_agreed": "true" if safety_agreed else "false",
    }
    timeout = get_kind(kind).generator_timeout
    headers = {"X-Job-Id": job_id}
    url = settings.generator_url + "/v1/renders"
    if image_path is None:
        response = _session.post(url, data=fields, headers=headers, timeout=timeout)
    else:
        with open(image_path, "rb") as image:
            files = {"image": (os.path.basename(image_path), image)}
            response = _session.post(url, data=fields, files=files, headers=headers, timeout=timeout)
    if response.status_code != 200:
        raise classify_response(response)
    return response.content


def render_photo(settings: Settings, job_id: str, params: dict, safety_agreed: bool,
                 image_path: Optional[str]) -> bytes:
    """photo.render: the user's photo in the chosen style."""
    return _call(settings, job_id, "photo.render", params, safety_agreed, image_path)


def generate_image(settings: Settings, job_id: str, params: dict, safety_agreed: bool,
                   image_path: Optional[str]) -> bytes:
    """image.generate: an image from the prompt alone."""
    return _call(settings, job_id, "image.generate", params, safety_agreed, None)
