"""OpenAPI additions FastAPI cannot infer: the documentation-only schemas (``Problem``,
``StepRequest``, whose ``inputs`` are the served models' exact inputs once the app has started),
problem+json on every error response, and ``X-Request-ID`` on every response."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from service.api.problems import PROBLEM_MEDIA_TYPE
from service.api.schemas import REQUEST_ID_DOC, Problem, StepRequest, inputs_schema
from service.api.sse import generate_schema
from service.api.state import app_state


def install_openapi(app: FastAPI) -> None:
    """Wrap ``app.openapi`` (FastAPI's documented way to extend the schema); built once, cached."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (Problem, StepRequest):
            definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(definition.pop("$defs", {}))
            schemas[model.__name__] = definition
        sessions = app_state(app).sessions
        if sessions is not None:  # served: the step's inputs exactly, so clients and fuzzers send valid ones
            contracts = {name: m.contract for name, m in sessions.models.items()}
            limit = app_state(app).settings.max_steps_per_request
            schemas["StepRequest"]["properties"]["inputs"] = inputs_schema(contracts, limit)
            vocabs = [len(c.vocab) for c in contracts.values() if c.kind == "token_lm" and c.vocab]
            generation = schema.get("paths", {}).get("/v1/sessions/{session_id}/generate", {}).get("post")
            if vocabs and generation is not None:  # ids valid for every served token LM
                body = generation["requestBody"]["content"]["application/json"]
                body["schema"] = generate_schema(min(vocabs), limit, app_state(app).settings.max_generate_tokens)
        problem_content = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if operation.get("security"):  # behind the API key (service.api.auth)
                    operation["responses"].setdefault("401", {"description": "no or an unknown API key"})
                    operation["responses"].setdefault("429", {"description": "a per-key limit is reached"})
                for status, response in operation.get("responses", {}).items():
                    if status[:1] in "45":  # FastAPI's default 422 is not what we send
                        response["content"] = problem_content
                    response.setdefault("headers", {})["X-Request-ID"] = REQUEST_ID_DOC
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        # FastAPI's generate() cached it; before start-up the inputs are unknown: build it again later.
        app.openapi_schema = schema if sessions is not None else None
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
