"""The multi-host system, built once for the module and torn down after it, also when a test or
the start-up itself fails."""
from __future__ import annotations

from typing import Iterator

import pytest

from tests.multihost.cluster import Cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    system = Cluster(tmp_path_factory.mktemp("multihost"))
    try:
        yield system.start()
    finally:
        system.stop()
