"""Fixtures for the Helm chart tests: a real helm binary and cached renders."""

import os

import pytest
from helm_chart import CASES, helm_path, render


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary. Missing helm is a failure, not a skip: `make test` builds it."""
    path = helm_path()
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"helm not found at {path}: run `bash k8s/tools/fetch-helm.sh .tools/bin` "
                    "(or `make test`), or point HERD_HELM at a helm binary")
    return str(path)


@pytest.fixture(scope="session")
def renders(helm) -> dict[str, list[dict]]:
    """Manifests of every render case, rendered once per session."""
    return {name: render(*args) for name, args in CASES.items()}
