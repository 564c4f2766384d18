"""The dispatcher in-process: concurrency bound, shutdown, return validation.

These drive `Dispatcher` directly with a small schema of their own, because the
behaviours under test (a call still running when SIGTERM arrives, a handler
that returns garbage) need verbs whose timing and output the test controls.
The same dispatcher serves the real daemon; tests/test_lifecycle.py covers the
process-level shutdown.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.helpers import run
from vdsmlite import errors
from vdsmlite.metrics import Metrics
from vdsmlite.rpc.dispatch import CallContext, Dispatcher, DispatcherState, Handler
from vdsmlite.rpc.encoded import Encoded
from vdsmlite.rpc.schema import Schema, SchemaError

pytestmark = pytest.mark.unit

CTX = CallContext("test", "local")

SCHEMA = {
    "verbs": {
        "Test.sleep": {"doc": "Sleep.", "params": [{"name": "seconds", "type": "number"}],
                       "returns": {"type": "boolean"}},
        "Test.echo": {"doc": "Echo.", "params": [{"name": "value", "type": "any"}],
                      "returns": {"type": "any"}},
        "Test.badReturn": {"doc": "Returns an int where a string is promised.",
                           "returns": {"type": "string"}},
        "Test.unencodable": {"doc": "Returns a set.", "returns": {"type": "any"}},
        "Test.encoded": {"doc": "Returns what it is given, encoded ahead.",
                         "params": [{"name": "value", "type": "any"}],
                         "returns": {"type": "string"}},
        "Test.fail": {"doc": "Raises a VDSM error.", "errors": ["StorageDomainDoesNotExist"]},
        "Test.crash": {"doc": "Raises a plain exception."},
    }
}


class Handlers:
    def __init__(self) -> None:
        self.running = 0
        self.peak = 0

    async def sleep(self, seconds: float) -> bool:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.running -= 1
        return True

    async def echo(self, value: Any) -> Any:
        return value

    async def bad_return(self) -> Any:
        return 42

    async def unencodable(self) -> Any:
        return {1, 2}

    async def encoded(self, value: Any) -> Encoded:
        return Encoded(value)

    async def fail(self) -> None:
        raise errors.StorageDomainDoesNotExist("c2a6d7c8-8d81-4e01-9ed4-7eb670713448")

    async def crash(self) -> None:
        raise KeyError("boom")


def make(max_concurrent: int = 16, validate: bool = True,
         serve: bool = True) -> tuple[Dispatcher, Handlers]:
    h = Handlers()
    handlers: dict[str, Handler] = {
        "Test.sleep": h.sleep, "Test.echo": h.echo, "Test.badReturn": h.bad_return,
        "Test.unencodable": h.unencodable, "Test.encoded": h.encoded, "Test.fail": h.fail,
        "Test.crash": h.crash}
    d = Dispatcher(Schema(SCHEMA, "test"), handlers, Metrics(), max_concurrent=max_concurrent,
                   validate_returns=validate)
    if serve:
        d.serve()
    return d, h


def req(method: str, params: Any = None, msg_id: Any = 1) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": msg_id, "method": method}
    if params is not None:
        msg["params"] = params
    return json.dumps(msg).encode()


async def call(d: Dispatcher, method: str, params: Any = None, msg_id: Any = 1) -> Any:
    reply = await d.handle(req(method, params, msg_id), CTX)
    assert reply is not None
    return json.loads(reply)


def test_vdsm_error_shape() -> None:
    async def main() -> None:
        d, _ = make()
        reply = await call(d, "Test.fail")
        assert reply["error"] == {
            "code": 358,
            "message": "Storage domain does not exist: ('c2a6d7c8-8d81-4e01-9ed4-7eb670713448',)"}
    run(main())


def test_unexpected_exception_is_internal_error() -> None:
    async def main() -> None:
        d, _ = make()
        reply = await call(d, "Test.crash")
        assert reply["error"]["code"] == -32603
        assert "KeyError" in reply["error"]["message"]
    run(main())


def test_not_ready_answers_99() -> None:
    async def main() -> None:
        d, _ = make(serve=False)
        assert d.state is DispatcherState.STARTING
        reply = await call(d, "Test.echo", {"value": 1})
        assert reply["error"]["code"] == 99
    run(main())


def test_lifecycle_starting_serving_stopping() -> None:
    async def main() -> None:
        d, _ = make(serve=False)
        d.ready = True  # the older spelling of serve(), still accepted
        assert d.state is DispatcherState.SERVING and d.ready
        assert (await call(d, "Test.echo", {"value": 1}))["result"] == 1
        with pytest.raises(ValueError):
            d.ready = False
        d.begin_shutdown()
        d.serve()  # too late: stopping is final
        assert d.state is DispatcherState.STOPPING and not d.ready
        assert (await call(d, "Test.echo", {"value": 1}))["error"]["code"] == 3001
        # Stopped before it ever served (a start-up that failed): 3001, not 99.
        d2, _ = make(serve=False)
        d2.begin_shutdown()
        assert (await call(d2, "Test.echo", {"value": 1}))["error"]["code"] == 3001
        # An unknown verb is unknown whatever the state.
        assert (await call(d2, "No.such"))["error"]["code"] == -32601
    run(main())


def test_concurrency_is_bounded() -> None:
    async def main() -> None:
        d, h = make(max_concurrent=3)
        replies = await asyncio.gather(*(call(d, "Test.sleep", {"seconds": 0.05}, i)
                                         for i in range(12)))
        assert all(r["result"] is True for r in replies)
        assert h.peak == 3
    run(main())


def test_return_validation_catches_schema_drift() -> None:
    async def main() -> None:
        d, _ = make(validate=True)
        reply = await call(d, "Test.badReturn")
        assert reply["error"]["code"] == -32603
        assert "outside its schema" in reply["error"]["message"]
        d2, _ = make(validate=False)
        assert (await call(d2, "Test.badReturn"))["result"] == 42
    run(main())


def test_unencodable_result_spoils_only_its_own_batch_reply() -> None:
    async def main() -> None:
        d, _ = make(validate=False)
        raw = await d.handle(json.dumps([
            {"jsonrpc": "2.0", "id": 1, "method": "Test.unencodable"},
            {"jsonrpc": "2.0", "id": 2, "method": "Test.echo", "params": {"value": "ok"}},
        ]).encode(), CTX)
        assert raw is not None
        replies = {r["id"]: r for r in json.loads(raw)}
        assert replies[1]["error"]["code"] == -32603
        assert replies[2]["result"] == "ok"
    run(main())


def test_shutdown_lets_calls_finish_then_cancels_stragglers() -> None:
    async def main() -> None:
        d, _ = make()
        quick = asyncio.create_task(call(d, "Test.sleep", {"seconds": 0.1}, "quick"))
        slow = asyncio.create_task(call(d, "Test.sleep", {"seconds": 60}, "slow"))
        await asyncio.sleep(0.02)
        d.begin_shutdown()
        # New calls are refused while the old ones drain.
        refused = await call(d, "Test.echo", {"value": 1}, "late")
        assert refused["error"]["code"] == 3001
        await d.drain(grace=0.5)
        assert (await quick)["result"] is True
        stopped = await slow
        assert stopped["id"] == "slow"
        assert stopped["error"]["code"] == 443
        assert d.in_flight == 0
    run(main())


def test_transport_teardown_does_not_abort_the_call() -> None:
    async def main() -> None:
        d, h = make()
        outer = asyncio.create_task(call(d, "Test.sleep", {"seconds": 0.2}))
        await asyncio.sleep(0.05)
        outer.cancel()  # e.g. the HTTP handler of a client that went away
        with pytest.raises(asyncio.CancelledError):
            await outer
        assert d.in_flight == 1  # the call itself carries on to completion
        await d.drain(grace=5)
        assert d.in_flight == 0 and h.running == 0
    run(main())


def test_handler_params_must_match_schema() -> None:
    async def wrong(seconds_typo: float) -> bool:
        return True

    _, h = make()
    handlers: dict[str, Handler] = {
        "Test.sleep": wrong, "Test.echo": h.echo, "Test.badReturn": h.bad_return,
        "Test.unencodable": h.unencodable, "Test.encoded": h.encoded, "Test.fail": h.fail,
        "Test.crash": h.crash}
    with pytest.raises(RuntimeError, match="handler params"):
        Dispatcher(Schema(SCHEMA, "test"), handlers, Metrics())
    with pytest.raises(RuntimeError, match="no handler"):
        Dispatcher(Schema(SCHEMA, "test"), {"Test.echo": h.echo}, Metrics())


@pytest.mark.parametrize("doc", [
    {"verbs": {"Nodot": {"doc": "x"}}},
    {"verbs": {"A.b": {}}},  # no doc
    {"verbs": {"A.b": {"doc": "x", "errors": ["NoSuchError"]}}},
    {"verbs": {"A.b": {"doc": "x", "params": [{"name": "a", "type": "int"},
                                              {"name": "a", "type": "int"}]}}},
    {"verbs": {"A.b": {"doc": "x", "params": [{"name": "a", "type": "wat"}]}}},
    {"verbs": {"A.b": {"doc": "x", "bogus": 1}}},
])
def test_broken_schema_is_refused(doc: dict) -> None:
    with pytest.raises(SchemaError):
        Schema(doc, "test")


def test_a_result_encoded_ahead_goes_out_as_its_bytes_and_is_still_checked() -> None:
    async def main() -> None:
        d, _ = make()
        raw = await d.handle(req("Test.encoded", {"value": "caf\u00e9"}), CTX)
        assert raw is not None and b'"result":"caf\xc3\xa9"' in raw
        # validate_returns looks at what the bytes decode to: a number is no string
        reply = await call(d, "Test.encoded", {"value": 7})
        assert reply["error"]["code"] == -32603
        assert "outside its schema" in reply["error"]["message"]
    run(main())
