"""Session fixtures: the tiny stock pipelines, built and saved once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.stock.builders import BUILDERS, save_stock_pipeline

KINDS = tuple(BUILDERS)


@pytest.fixture(scope="session")
def stock_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``kind → saved pipeline folder`` for every stock kind (sd3, sd3-no-t5, flux, sdxl, pixart-sigma)."""
    root = tmp_path_factory.mktemp("stock")
    return {kind: save_stock_pipeline(kind, root / kind) for kind in KINDS}
