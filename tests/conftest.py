"""Test order for two xdist workers (`make test`): the suite's critical path is the DVC end-to-end tests
(tests/test_pipeline_dvc.py), most of which copy one shared reproduced pipeline. So the test that builds it goes
first and the recipe test with its own repository second (xdist hands the first tests out one per worker), the
other slow tests next, the fast ones after, and the tests that copy the shared build last, when it is ready: no
worker waits on the build's lock while other work is left."""

from __future__ import annotations

import os

import pytest

# As the CLI sets it for every stage (stages/cli.py): the two workers, and the tests beside a `dvc repro`, share
# the cores without spinning through each other's time.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")


def _rank(item: pytest.Item) -> int:
    if "reproduced" in getattr(item, "fixturenames", ()):
        return 0 if item.name.startswith("test_dvc_repro_builds") else 4
    if item.get_closest_marker("slow"):
        return 1 if item.module.__name__ == "test_pipeline_dvc" else 2
    return 3


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: each group keeps its files' order
