"""How the API lets go of a generation: EventStream closes its source however the response ends, and
unless_disconnected cancels a whole-answer request whose client left. The engine row goes at once, not at GC."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import ClientDisconnect

from server.api.errors import GenerationFailed
from server.api.inference import EventStream, unless_disconnected
from server.engine.request import TokenDelta


async def test_event_stream_closes_its_source_when_the_client_leaves():
    closed: list[str] = []

    async def source():
        try:
            while True:
                yield "token"
                await asyncio.sleep(0.01)
        finally:
            closed.append("source")

    async def events(deltas):
        async for delta in deltas:
            yield f"data: {delta}\n\n"

    deltas = source()
    body = events(deltas)  # both held here, so only an explicit aclose() can close them
    sent = asyncio.Event()

    async def receive():
        await sent.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body":
            sent.set()
            await asyncio.sleep(1)  # a slow socket: the client leaves while an event is being written

    scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST", "path": "/", "headers": []}
    await asyncio.wait_for(EventStream(body, sources=[deltas])(scope, receive, send), timeout=5)
    assert closed == ["source"]
    assert body.ag_frame is None  # the body iterator is finished too


class _Request:
    """What unless_disconnected reads of a request: its ASGI receive."""

    def __init__(self, disconnect_after: float | None):
        self.disconnect_after = disconnect_after

    async def receive(self):
        if self.disconnect_after is None:
            await asyncio.Event().wait()  # never
        await asyncio.sleep(self.disconnect_after)
        return {"type": "http.disconnect"}


async def test_unless_disconnected_returns_the_result_and_raises_errors_unwrapped():
    async def answer():
        return 42

    async def failing():
        raise GenerationFailed("boom")

    assert await unless_disconnected(_Request(None), answer()) == 42
    with pytest.raises(GenerationFailed):  # not an ExceptionGroup: the HTTP error mapping must see it
        await unless_disconnected(_Request(None), failing())


async def test_unless_disconnected_cancels_the_work_when_the_client_leaves():
    cancelled = asyncio.Event()

    async def forever():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(ClientDisconnect):
        await asyncio.wait_for(unless_disconnected(_Request(0.01), forever()), timeout=5)
    assert cancelled.is_set()


def test_a_failed_generation_is_a_500_or_an_error_event_in_each_shape(open_client, monkeypatch):
    def failing(request, lease=None):
        lease.release()

        async def deltas():
            yield TokenDelta([], "", finish_reason="error", error="the device fell over")

        return [deltas()]

    monkeypatch.setattr(open_client.app.state.engine, "generate_choices", failing)
    message = "generation failed: the device fell over"
    native = open_client.post("/v1/tasks/base/generate", json={"prompt": "x"})
    assert native.status_code == 500 and native.json() == {"error": {"type": "internal", "message": message}}
    completion = open_client.post("/v1/completions", json={"model": "base", "prompt": "x"})
    assert completion.status_code == 500
    assert completion.json()["error"] == {"message": message, "type": "server_error", "param": None, "code": "internal"}
    native_stream = open_client.post("/v1/tasks/base/generate", json={"prompt": "x", "stream": True}).text
    assert native_stream.startswith("event: error\ndata: ") and message in native_stream
    chat = {"model": "base", "messages": [{"role": "user", "content": "x"}], "stream": True}
    events = [e for e in open_client.post("/v1/chat/completions", json=chat).text.split("\n\n") if e]
    assert json.loads(events[-2].removeprefix("data: "))["error"]["message"] == message
    assert events[-1] == "data: [DONE]"
