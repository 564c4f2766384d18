"""Errors of the JSON-RPC 2.0 protocol itself (-32700 ... -32603).

These belong to the RPC layer: a request that is not JSON, not a request, names
no known verb or carries params the schema refuses never reaches a verb.  What a
verb itself raises is a `vdsmlite.errors.VdsmError` with a VDSM code.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vdsmlite.errors import VdsmLiteError


class JsonRpcError(VdsmLiteError):
    code: ClassVar[int] = -32603
    msg: ClassVar[str] = "Internal JSON-RPC error"

    def __init__(self, detail: str = "", data: Any = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.data = data

    @property
    def message(self) -> str:
        return f"{self.msg}: {self.detail}" if self.detail else self.msg

    def to_json(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


class JsonRpcParseError(JsonRpcError):
    code = -32700
    msg = "Parse error"


class JsonRpcInvalidRequest(JsonRpcError):
    code = -32600
    msg = "Invalid request"


class JsonRpcMethodNotFound(JsonRpcError):
    code = -32601
    msg = "Method not found"


class JsonRpcInvalidParams(JsonRpcError):
    code = -32602
    msg = "Invalid params"

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}", data={"param": param, "reason": reason})
        self.param = param
        self.reason = reason


class JsonRpcInternalError(JsonRpcError):
    code = -32603
    msg = "Internal JSON-RPC error"
