"""Shared fixtures. Tests run on CPU; data from ../shared/data are used when present."""

import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"

# Each area keeps its shared fixtures in tests/fixtures_<area>.py; they are all loaded here.
pytest_plugins = sorted(f"tests.{p.stem}" for p in (ROOT / "tests").glob("fixtures_*.py"))


def _shared_or_skip(*parts: str) -> pathlib.Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (../shared absent)")
    return path


@pytest.fixture
def industrial_dir() -> pathlib.Path:
    return _shared_or_skip("minionerec", "Industrial_and_Scientific")


@pytest.fixture
def office_dir() -> pathlib.Path:
    return _shared_or_skip("minionerec", "Office_Products")


@pytest.fixture
def gsm8k_dir() -> pathlib.Path:
    return _shared_or_skip("gsm8k")


@pytest.fixture
def jobset_crd() -> pathlib.Path:
    path = SHARED / "k8s" / "jobset.x-k8s.io_jobsets.yaml"
    if not path.exists():
        pytest.skip("JobSet CRD schema not available (../shared absent)")
    return path
