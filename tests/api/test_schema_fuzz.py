"""Schemathesis over every operation of the OpenAPI spec, in process: no 5xx, and every answer as documented.

Bounded: `EXAMPLES` generated requests per operation (positive and negative), without Schemathesis' coverage phase,
which enumerates every boundary of every field (thousands of calls over the OpenAI routes' two dozen fields). The
backbone is a tiny random llama with the default model's tokenizer and chat template: the HTTP layer is what is
tested, and a generation takes milliseconds, so the whole run takes well under a minute on two cores.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from peft_reference import tiny_llama
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.types import Receive, Scope, Send

from server.app import create_app
from server.config import Settings
from server.engine.backbone import Backbone

EXAMPLES = 60
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
SETTINGS = Settings(store="memory://", max_new_tokens=16, max_batch_size=8)


class Target:
    """The app Schemathesis calls: the spec is read at import (no model needed), the calls go to an app that the
    `served` fixture builds on the loaded backbone and runs (its lifespan is the fixture's, not Schemathesis')."""

    app = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await self.app(scope, receive, send)


TARGET = Target()
CONFIG = schemathesis.Config.from_dict({"phases": {"coverage": {"enabled": False}}})
schema = schemathesis.openapi.from_dict(create_app(SETTINGS).openapi(), config=CONFIG)
schema.app = TARGET


@pytest.fixture(scope="module", autouse=True)
def served(backbone) -> Iterator[None]:
    tiny = Backbone(tiny_llama(vocab_size=backbone.geometry.vocab_size, hidden_size=32), backbone.tokenizer, "tiny")
    app = create_app(SETTINGS, backbone=tiny)
    with TestClient(app):
        TARGET.app = app
        yield
    TARGET.app = None


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation_answers_as_documented(case) -> None:
    case.call_and_validate(checks=CHECKS)
