"""The Responses API's store: the last stored responses, each with the chat history it continues
and its input items (for previous_response_id, GET /v1/responses/{id} and its input_items), in
memory, bounded by count and bytes."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from server.errors import bad_request, dumps
from server.responses_items import new_id

@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]
    history: list[dict[str, Any]]       # the chat messages up to and including this reply
    # the items the reply answered: the ones the previous responses held, then this input
    inputs: list[dict[str, Any]] = field(default_factory=list)
    nbytes: int = 0


STORE_BYTES = 256 * 2**20   # all stored responses together, as JSON text


class ResponseStore:
    """The last ``capacity`` stored responses, at most STORE_BYTES of them, in memory (lost at
    restart, as documented)."""

    def __init__(self, capacity: int, max_bytes: int = STORE_BYTES) -> None:
        self.capacity, self.max_bytes = capacity, max_bytes
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response: dict[str, Any], history: list[dict[str, Any]],
            inputs: list[dict[str, Any]]) -> None:
        if self.capacity <= 0:
            return
        entry = Stored(response, history, inputs,
                       len(dumps(response)) + len(dumps(history)) + len(dumps(inputs)))
        with self._lock:
            old = self._items.pop(response["id"], None)
            self._bytes += entry.nbytes - (old.nbytes if old else 0)
            self._items[response["id"]] = entry
            while self._items and (len(self._items) > self.capacity or self._bytes > self.max_bytes):
                self._bytes -= self._items.popitem(last=False)[1].nbytes

    def get(self, response_id: str) -> Optional[Stored]:
        with self._lock:
            return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            entry = self._items.pop(response_id, None)
            self._bytes -= entry.nbytes if entry else 0
            return entry is not None


def input_items(items: Union[str, list[Any]]) -> list[dict[str, Any]]:
    """The request's input as the items input_items lists, each with an id (``items`` already
    read by input_messages, so their shapes hold): text as input_text or output_text parts."""
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    out = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            assistant = item["role"] == "assistant"
            content = item.get("content") or ""
            if isinstance(content, str):
                content = [{"type": "output_text", "text": content, "annotations": []} if assistant
                           else {"type": "input_text", "text": content}]
            out.append({"id": item.get("id") or new_id("msg_"), "type": "message",
                        "role": item["role"], "status": item.get("status") or "completed",
                        "content": content})
        else:
            prefix = {"function_call": "fc_", "function_call_output": "fco_"}.get(kind, "rs_")
            extra = {} if kind == "reasoning" else {"status": item.get("status") or "completed"}
            out.append({**item, **extra, "id": item.get("id") or new_id(prefix)})
    return out


def page(items: list[dict[str, Any]], limit: int, order: str, after: Optional[str],
         before: Optional[str]) -> dict[str, Any]:
    """One page of a list, OpenAI's way: ``order`` asc or desc, from after the item ``after``
    and before the item ``before``, at most ``limit``."""
    if not 1 <= limit <= 100:
        raise bad_request("limit must lie in 1..100", "limit")
    if order not in ("asc", "desc"):
        raise bad_request("order must be asc or desc", "order")
    seq = items if order == "asc" else items[::-1]
    ids = [i["id"] for i in seq]
    for name, cursor in (("after", after), ("before", before)):
        if cursor is not None and cursor not in ids:
            raise bad_request(f"{name}: no item with id '{cursor}' in this response's input", name)
    start = ids.index(after) + 1 if after is not None else 0
    end = ids.index(before) if before is not None else len(seq)
    window = seq[start:end]
    # before alone pages backwards: the last items before the cursor
    data = window[-limit:] if before is not None and after is None else window[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(window) > limit}
