"""Schemathesis against the served `/openapi.json`: no input gives a 500, and every answer matches the document.

Schemathesis reads the document from the live server, generates requests from
it (valid ones, and invalid ones that must be refused with a 4xx), sends them
over real HTTP and runs all its checks on the answers: no server error, a status
code, content type, headers and body that the document declares, 405 for an
undeclared method, and, with the token, 401 when auth is left out. So this test
also keeps the hand-written document honest.

`/events` is left out: it streams until the client leaves, which a
request-response checker cannot do. Its tests are in test_api.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from actorflow.actors import Runtime
from actorflow.api import ApiServer, create_app, serve_in_background
from actorflow.api._idempotency import check_key
from actorflow.api._openapi import openapi_document
from actorflow.core import RuntimeConfig
from actorflow.services import seed_pipeline

TOKEN = "schema-token"
SEED = (seed_pipeline(print, print, print),)
"""The shape of the pipeline the servers below run: the document lists its name and states."""


@pytest.fixture
def open_server() -> Iterator[ApiServer]:
    runtime = Runtime(RuntimeConfig())
    try:
        with serve_in_background(create_app(runtime)) as server:
            yield server
    finally:
        runtime.close(drain=False)


@pytest.fixture
def secured_server() -> Iterator[ApiServer]:
    runtime = Runtime(RuntimeConfig())
    try:
        with serve_in_background(create_app(runtime, token=TOKEN)) as server:
            yield server
    finally:
        runtime.close(drain=False)


_SETTINGS = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,  # the same examples on every run: a CI failure reproduces locally
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)

# The document is data (`openapi_document`), so the schema is built from it at import
# time, when pytest collects one test per operation; the test below checks that the
# server serves exactly this document.
open_api = schemathesis.openapi.from_dict(openapi_document(token_required=False, pipelines=SEED)).exclude(
    path="/events"
)
# The token goes in through schemathesis's own auth config (not as a fixed header), so
# that it knows which requests are meant to lack it and expects 401 for those.
secured_api = schemathesis.openapi.from_dict(
    openapi_document(token_required=True, pipelines=SEED),
    config=schemathesis.Config.from_dict({"auth": {"openapi": {"bearer": {"bearer": TOKEN}}}}),
).exclude(path="/events")


def test_the_server_serves_the_document_that_is_tested(open_server: ApiServer, secured_server: ApiServer) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{open_server.url}/openapi.json").json() == openapi_document(token_required=False, pipelines=SEED)
    assert httpx.get(f"{secured_server.url}/openapi.json", headers=headers).json() == openapi_document(
        token_required=True, pipelines=SEED
    )


def give_each_case_its_own_idempotency_key(case: schemathesis.Case) -> None:
    """Generated keys come from a tiny space, so cases would reuse each other's keys with other payloads.

    That earns a 422 by design (tested in test_api.py), which schemathesis would
    count as a valid request refused. A valid generated key is swapped for a
    unique one; an invalid one is kept, to be refused with 400.
    """
    key = case.headers.get("Idempotency-Key") if case.headers else None
    if key is not None and check_key(key) is None:
        case.headers["Idempotency-Key"] = uuid.uuid4().hex


@open_api.parametrize()
@_SETTINGS
def test_no_generated_request_gets_a_500_or_an_answer_the_document_does_not_declare(
    case: schemathesis.Case, open_server: ApiServer
) -> None:
    give_each_case_its_own_idempotency_key(case)
    case.call_and_validate(base_url=open_server.url, timeout=10)


@secured_api.parametrize()
@_SETTINGS
def test_with_a_token_no_generated_request_gets_a_500_and_leaving_auth_out_gets_401(
    case: schemathesis.Case, secured_server: ApiServer
) -> None:
    give_each_case_its_own_idempotency_key(case)
    case.call_and_validate(base_url=secured_server.url, timeout=10)
