"""HTTP client for the image generator: `POST {GENERATOR_URL}/v1/renders`, one call per
attempt, PNG bytes back or a classified failure raised."""
from __future__ import annotations

from typing import Optional

import requests

from config.kinds import get_kind
from renderq.generator.errors import classify_response

_session = requests.Session()


def render(generator_url: str, job_id: str, kind: str, params: dict, safety_agreed: bool,
           image: Optional[tuple[str, bytes]]) -> bytes:
    """The rendered PNG; `image` is (file name, bytes) for kinds that take a photo."""
    fields = {
        "kind": kind,
        "style": params.get("style") or "",
        "prompt": params.get("prompt") or "",
        "safety_agreed": "true" if safety_agreed else "false",
    }
    files = {"image": image} if image is not None else None
    response = _session.post(generator_url + "/v1/renders", data=fields, files=files, headers={"X-Job-Id": job_id},
                             timeout=get_kind(kind).generator_timeout)
    if response.status_code != 200:
        raise classify_response(response)
    return response.content
