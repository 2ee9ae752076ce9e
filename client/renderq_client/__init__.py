"""A client for the renderq job API: `Client` in Python, `renderq` on the command line."""
from __future__ import annotations

__version__ = "0.1.0"

from renderq_client.client import Client  # noqa: E402  (after __version__, which client.py reads)
from renderq_client.errors import (  # noqa: E402
    Conflict, Forbidden, InsufficientCredits, NetworkError, NotFound, RenderqError, TooLarge, Unauthorized,
    WaitTimeout,
)
from renderq_client.models import Account, Job, JobError  # noqa: E402

__all__ = [
    "Account", "Client", "Conflict", "Forbidden", "InsufficientCredits", "Job", "JobError", "NetworkError",
    "NotFound", "RenderqError", "TooLarge", "Unauthorized", "WaitTimeout", "__version__",
]
