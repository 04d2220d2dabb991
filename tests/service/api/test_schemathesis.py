"""schemathesis against the served OpenAPI schema (a token LM, API keys on), bounded (few
examples per operation): every generated request, valid or not, gets a documented answer and
never a 5xx; schema-valid bodies are accepted, requests without a valid key refused. A valid
request's ``session_id`` is a live session one token in, so the operations run for real instead
of answering 404."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from service.engine.model import RecurrentModel
from service.keys import key_line, new_key
from tests.live_server import LiveServer, live_server
from tests.redis_fixture import RedisServer
from tests.service.api.test_http import db_url

MAX_EXAMPLES = 20


KEY = new_key()
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def fuzzed(
    redis_server: RedisServer, loaded: dict[str, RecurrentModel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    # With API keys on, as the schema declares them: schemathesis also checks that requests
    # without a key, or with a wrong one, are refused.
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(key_line("fuzz", KEY) + "\n")
    models = {"tokens": loaded["token_gru"]}  # a token LM: the generate route runs too
    with live_server(
        db_url(redis_server, 7), models, max_steps_per_request=64, max_generate_tokens=64, api_keys_file=keys
    ) as server:
        yield server


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_the_api_keeps_its_schema(fuzzed: LiveServer, mode: GenerationMode) -> None:
    # The schema the running server serves (its step inputs are the served model's). schemathesis'
    # pytest loader (``from_fixture``) does not run on pytest 9, so each operation's strategy is
    # driven by hypothesis here.
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results), [r for r in results if not isinstance(r, Ok)]  # the schema loads whole
    assert len(operations) >= 10
    skipped: list[str] = []

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case: schemathesis.Case[Any]) -> None:
            # Valid requests run on a live session; invalid ones keep their generated id (404 is a rejection).
            if mode is GenerationMode.POSITIVE and "session_id" in (case.path_parameters or {}):
                created = httpx.post(f"{fuzzed.url}/v1/sessions", json={}, headers=AUTH, timeout=30)
                assert created.status_code == 201, created.text
                sid = created.json()["session_id"]
                # One token in, so that a generation without a prompt has a prediction to continue from.
                first = httpx.post(
                    f"{fuzzed.url}/v1/sessions/{sid}/step", json={"inputs": {"tokens": [1]}}, headers=AUTH
                )
                assert first.status_code == 200, first.text
                case.path_parameters = {**(case.path_parameters or {}), "session_id": sid}
                if case.operation.definition.raw.get("operationId") == "importState":
                    # A binary body's validity (a well-formed .npz) is beyond a schema: upload a real one.
                    case.body = httpx.get(f"{fuzzed.url}/v1/sessions/{sid}/state", headers=AUTH, timeout=30).content
            case.call_and_validate(base_url=fuzzed.url, headers=AUTH, timeout=30)

        try:
            check()
        except Unsatisfiable:  # nothing to make invalid: no parameter, no body
            assert mode is GenerationMode.NEGATIVE, operation.label
            assert not list(operation.iter_parameters()) and "requestBody" not in operation.definition.raw
            skipped.append(operation.label)
    assert len(skipped) < len(operations) / 2, skipped
