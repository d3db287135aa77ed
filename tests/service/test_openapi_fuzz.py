"""Schemathesis over the OpenAPI schema: no generated request gets a 5xx answer.

The service answers unknown domains with the backbone (``MDLORA_UNKNOWN_DOMAIN=backbone``) so
that generated predict bodies reach encoding and scoring instead of stopping at a 404.
``MDLORA_FUZZ_EXAMPLES`` is the number of cases per operation (default 100: about 1,100 cases
in ~30 s); ``MDLORA_FUZZ_REPORT=FILE`` writes the counts (cases, calls, answers by status)
there as JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from mdlora.service.app import create_app
from mdlora.service.settings import ServiceSettings
from tests.service.demo import build_demo_artifact
from tests.service.helpers import ADMIN_TOKEN, AUTH, live_server

# The schema is the app's own; a lazily loaded one (schemathesis.pytest.from_fixture) does not
# work with this pytest version, and generating the schema needs no running model.
_SCHEMA_APP = create_app(ServiceSettings(artifact_dir=Path(tempfile.gettempdir())))
schema = schemathesis.openapi.from_dict(_SCHEMA_APP.openapi())
EXAMPLES = int(os.environ.get("MDLORA_FUZZ_EXAMPLES", "100"))
COUNTS: Counter[str] = Counter()


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    art = build_demo_artifact(tmp_path_factory.mktemp("fuzz") / "art", method="mlora")
    app = create_app(
        ServiceSettings(artifact_dir=art, admin_token=ADMIN_TOKEN, unknown_domain="backbone")
    )
    with live_server(app) as url:
        yield url
    report = os.environ.get("MDLORA_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps(dict(sorted(COUNTS.items())), indent=1))


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
def test_no_request_gets_a_server_error(case: schemathesis.Case, base_url: str) -> None:
    COUNTS["cases"] += 1
    COUNTS[f"cases {case.method} {case.path}"] += 1
    for headers in (AUTH, {}):
        response = case.call(base_url=base_url, headers=headers, timeout=30)
        COUNTS["calls"] += 1
        COUNTS[f"status {response.status_code}"] += 1
        if case.path.startswith("/predict") and response.status_code == 200:
            COUNTS["predict scored"] += 1
        assert response.status_code < 500, (case.method, case.path, response.text[:500])
