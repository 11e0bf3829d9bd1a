"""Every bundle in the collection passes the verifier, offline: new bundles are covered without new tests."""

from __future__ import annotations

import json

import pytest

from common.bundle.verify import verify_bundle
from tests.helpers import REPO_ROOT

BUNDLES = sorted(p.parent for p in (REPO_ROOT / "bundles").glob("*/configs"))


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_bundle_passes_the_verifier(bundle):
    # built without published weights or the weights of an earlier stage, which a fresh clone lacks
    train = json.loads((bundle / "configs" / "train.json").read_text())
    offline = {"pretrained": False, "backbone_checkpoint": None}
    overrides = {key: value for key, value in offline.items() if key in train}
    report = verify_bundle(bundle, overrides=overrides)
    assert report.ok, report.format()


def test_the_collection_has_bundles():
    assert len(BUNDLES) >= 2
