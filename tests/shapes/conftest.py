"""Shared fixtures for the shapes tests: tiny random pipelines only, offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_mmdit():
    from segquant_shapes import tiny_random_pipeline

    return tiny_random_pipeline("mmdit", seed=0)


@pytest.fixture(scope="session")
def tiny_unet():
    from segquant_shapes import tiny_random_pipeline

    return tiny_random_pipeline("unet", seed=0)


@pytest.fixture(scope="session")
def tiny_flux():
    from segquant_shapes import tiny_random_pipeline

    return tiny_random_pipeline("flux", seed=0)
