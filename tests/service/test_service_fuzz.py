"""Schema-driven fuzzing: schemathesis against the served OpenAPI schema, over real HTTP on
127.0.0.1, positive and negative data for every operation. At least 500 requests, bounded
in time; no 500, no answer outside the schema (status, content type, body, headers), and
every request that breaks the schema rejected.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers import API_KEY

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]
EXAMPLES = {"POST": 110, "GET": 15, "PUT": 15, "DELETE": 15}  # per operation and generation mode
TIME_BUDGET_S = 60
MIN_REQUESTS = 500


def test_schemathesis_fuzz(live):
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/classify", "POST /v1/distances"}
    session = requests.Session()
    auth = {"Authorization": f"Bearer {API_KEY}"}
    sent: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []
    deadline = time.monotonic() + TIME_BUDGET_S

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = operation.label

            @settings(
                max_examples=EXAMPLES[operation.method.upper()],
                deadline=None,
                derandomize=True,  # the same requests every run
                database=None,
                phases=[Phase.generate],  # failures are collected below, never shrunk
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case) -> None:
                if time.monotonic() > deadline:
                    return
                response = case.call(base_url=live.url, session=session, headers=auth, timeout=10)
                sent[(case.operation.label, response.status_code)] += 1
                try:
                    case.validate_response(response, checks=CHECKS, headers=auth)
                except Exception as e:  # a FailureGroup naming the broken checks
                    failures.append(f"{case.operation.label}: {e}"[:3000])

            try:
                fuzz()
            except Unsatisfiable:  # nothing to break: an operation without parameters or body
                assert mode == GenerationMode.NEGATIVE, label

    total = sum(sent.values())
    summary = ", ".join(f"{label} {status}: {n}" for (label, status), n in sorted(sent.items()))
    assert not failures, f"{len(failures)} failures; first:\n" + "\n".join(failures[:3])
    assert not [key for key in sent if key[1] >= 500], summary
    if total < MIN_REQUESTS:
        pytest.fail(f"only {total} requests within {TIME_BUDGET_S} s: {summary}")
    print(f"\n{total} generated requests: {summary}")
