"""`python -m generator`: the threaded Flask dev server, for local runs without gunicorn."""
from __future__ import annotations

import os

from generator import create_app


def main() -> None:
    port = int(os.environ.get("GENERATOR_PORT", "5001"))
    # threaded=True matters: the concurrency faults and counters are meaningless on a serial server.
    create_app().run(host="127.0.0.1", port=port, threaded=True)


if __name__ == "__main__":
    main()
