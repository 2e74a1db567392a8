"""The server's published OpenAPI schema, fuzzed with schemathesis: every operation gets
generated bodies (valid and not), and none may be answered with a 5xx or hang.

The tiny model keeps each request fast; the app caps prompts at 256 tokens and answers
at 8 so that the generated requests stay small. The model name is set to the served
one, so that bodies reach the generation code (the wrong-name 404 is tested in
test_server.py)."""

from __future__ import annotations

import pytest
import rwkv_gpu
import schemathesis
from conftest import DATA, open_model
from hypothesis import HealthCheck, given, settings
from rwkv_gpu.server import create_app
from schemathesis import GenerationMode

NAME = "tiny"


@pytest.fixture(scope="module")
def api_schema():
    model = open_model(DATA / "tiny-rwkv7" / "model.safetensors", tokenizer="bytes")
    engine = rwkv_gpu.Engine(model, max_batch=4, max_queue=64)
    app = create_app(engine, NAME, max_prompt_tokens=256, max_output_tokens=8, response_store_bytes=16 * model.state_bytes)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    engine.close()


# Every operation of the schema (checked below, so that a new endpoint is not left out).
OPERATIONS = ["GET /health", "GET /metrics", "GET /v1/models", "GET /v1/models/{name}", "POST /v1/completions",
              "POST /v1/chat/completions", "POST /v1/embeddings", "POST /v1/responses"]
# schemathesis's pytest plugin fails under pytest 9 (`_nodeid`), so hypothesis drives its
# strategies directly: up to 25 cases per operation and mode.
CASES = [(label, "positive") for label in OPERATIONS] + [(label, "negative") for label in OPERATIONS if label.startswith("POST")]


@pytest.mark.parametrize(("label", "mode"), CASES)  # negative: bodies that break the schema
def test_no_server_errors(api_schema, label, mode):
    ops = {op.label: op for op in (r.ok() for r in api_schema.get_all_operations())}
    assert set(ops) == set(OPERATIONS), "the schema's operations changed: update OPERATIONS"
    strategy = ops[label].as_strategy(generation_mode=GenerationMode(mode))

    @given(case=strategy)
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = NAME
        response = case.call()
        assert response.status_code < 500, (case.method, case.path, case.body, response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert {"message", "type", "param", "code"} <= set(error) and error["message"], response.text

    check()
