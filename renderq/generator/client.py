"""HTTP client for the image generator: `POST {GENERATOR_URL}/v1/renders`, one call per
attempt, PNG bytes back or a classified failure raised.

The kind's generator timeout bounds the whole call, not each read: a generator that trickles
its answer a byte at a time is cut off like one that never answers. Connections are pooled
per process (and per thread)."""
from __future__ import annotations

import io
import threading
import time
from typing import Optional

import requests
from PIL import Image
from urllib3 import Timeout

from config.kinds import get_kind
from renderq.generator.errors import TransientFailure, classify_response

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_RESULT_BYTES = 64 * 1024 * 1024
_sessions = threading.local()


def _session() -> requests.Session:
    if not hasattr(_sessions, "session"):
        _sessions.session = requests.Session()
    return _sessions.session


def render(generator_url: str, job_id: str, kind: str, params: dict, safety_agreed: bool,
           image: Optional[tuple[str, bytes]]) -> bytes:
    """The rendered PNG; `image` is (file name, bytes) for kinds that take a photo."""
    fields = {
        "kind": kind,
        "style": params.get("style") or "",
        "prompt": params.get("prompt") or "",
        "safety_agreed": "true" if safety_agreed else "false",
    }
    seconds = get_kind(kind).generator_timeout
    deadline = time.monotonic() + seconds
    files = {"image": image} if image is not None else None
    with _session().post(generator_url + "/v1/renders", data=fields, files=files, headers={"X-Job-Id": job_id},
                         timeout=Timeout(connect=seconds, read=seconds, total=seconds), stream=True) as response:
        if response.status_code != 200:
            response.content  # an error body is small; classification reads it
            raise classify_response(response)
        return _png(_read_until(response, deadline, seconds))


def _read_until(response: requests.Response, deadline: float, seconds: float) -> bytes:
    body = bytearray()
    for chunk in response.iter_content(64 * 1024):
        body += chunk
        if time.monotonic() > deadline:
            raise requests.Timeout("the generator's answer took longer than %ss" % seconds)
        if len(body) > MAX_RESULT_BYTES:
            raise TransientFailure("GENERATOR_BAD_RESPONSE", "the generator's answer passed %d bytes" % MAX_RESULT_BYTES)
    return bytes(body)


def _png(body: bytes) -> bytes:
    """A 200 is a success only if it carries a PNG: anything else is the generator misbehaving."""
    try:
        if not body.startswith(PNG_SIGNATURE):
            raise ValueError("no PNG signature")
        with Image.open(io.BytesIO(body)) as picture:
            picture.verify()
    except Exception as error:
        raise TransientFailure("GENERATOR_BAD_RESPONSE", "200 without a valid PNG (%d bytes): %s"
                               % (len(body), error)) from None
    return body
