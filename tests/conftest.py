"""Shared fixtures: one SoftHSM token and one home for the whole test session.

SoftHSM reads its configuration once per initialisation of the module, and a process has one
module instance, so every test in a run shares this home and its token. Areas add their own
fixtures in tests/<area>/conftest.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import Settings, load_settings, write_default_config
from gateway.signing.hsm import Hsm
from gateway.signing.softhsm import ensure_softhsm_token, point_environment_at

TEST_RSA_LABEL = "test-rsa"
TEST_EC_LABEL = "test-ec"


@pytest.fixture(scope="session")
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("gateway-home")
    return home


@pytest.fixture(scope="session")
def softhsm_settings(session_home: Path) -> Settings:
    """Settings of the session home, with its SoftHSM token initialised."""
    settings = load_settings(session_home)
    write_default_config(settings)
    settings = load_settings(session_home)
    ensure_softhsm_token(settings)
    point_environment_at(settings)
    return settings


@pytest.fixture(scope="session")
def hsm(softhsm_settings: Settings) -> Iterator[Hsm]:
    h = Hsm.open(softhsm_settings)
    yield h
    h.close()


def _ensure_key(h: Hsm, label: str, key_type: str) -> str:
    if label not in {k.label for k in h.list_keys()}:
        h.generate_keypair(label, key_type)
    return label


@pytest.fixture(scope="session")
def rsa_key(hsm: Hsm) -> str:
    """Label of an RSA-2048 key generated in the session token."""
    return _ensure_key(hsm, TEST_RSA_LABEL, "rsa2048")


@pytest.fixture(scope="session")
def ec_key(hsm: Hsm) -> str:
    """Label of a P-256 key generated in the session token."""
    return _ensure_key(hsm, TEST_EC_LABEL, "p256")


@pytest.fixture(scope="session")
def ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def initialized_home(softhsm_settings: Settings) -> dict:
    """The session home after `gateway init`: test PKI, demo keys and certificates, catalog,
    SQLite database, demo clients. Returns the content of demo.json."""
    from gateway.bootstrap import init_home

    return init_home(settings=softhsm_settings)
