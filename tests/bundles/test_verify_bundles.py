"""Every bundle in the collection passes the verifier, offline: new bundles are covered without new tests."""

from __future__ import annotations

import socket

import pytest

from common.bundle.verify import verify_bundle
from tests.helpers import REPO_ROOT

BUNDLES = sorted(p.parent for p in (REPO_ROOT / "bundles").glob("*/configs"))


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_bundle_passes_the_verifier(bundle, monkeypatch):
    """As configured, in a fresh clone without network access: no weights downloaded, no earlier stage's."""

    def refuse(*args, **kwargs):
        raise AssertionError("the verifier tried to open a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    report = verify_bundle(bundle)
    assert report.ok, report.format()


def test_the_collection_has_bundles():
    assert len(BUNDLES) >= 2
