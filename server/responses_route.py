"""POST /v1/responses (OpenAI's Responses API), GET and DELETE /v1/responses/{id}.

A Responses request becomes a chat request (server/responses_items.py) and runs through the chat
route's own setup: the same template, tool formats, grammars and reasoning parsers. ResponsesJob
shapes what comes back: output items instead of choices, and in a stream the typed events the
OpenAI SDKs read (response.created, response.output_item.added, response.output_text.delta, ...,
response.completed), each as an SSE event named after its type.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from fastapi import FastAPI, Request
from starlette.responses import Response

from engine.protocol import FINISH_LENGTH
from server.body import read_json
from server.errors import APIError, JSONBody, encode
from server.generate import Generation, Piece
from server.openai_routes import ChatJob, chat_job
from server.openapi import body_schema, error_responses
from server.reasoning import REASONING
from server.responses import respond
from server.responses_items import (ResponsesRequest, call_item, chat_response_format,
                                    chat_tool_choice, chat_tools, check_supported, history_message,
                                    input_messages, message_item, new_id, output_items, output_text,
                                    reasoning_item, responses_param, with_instructions)
from server.responses_store import Stored, input_items, page
from server.schemas import chat_request, parse
from server.state import ServerState


class ResponsesJob(ChatJob):
    id_prefix, object_name = "resp_", "response"
    request: ResponsesRequest
    history: list[dict[str, Any]]

    def for_request(self, request: ResponsesRequest, history: list[dict[str, Any]],
                    inputs: list[dict[str, Any]]) -> "ResponsesJob":
        self.request, self.history, self.inputs = request, history, inputs
        self._items: list[dict[str, Any]] = []     # the stream's finished output items
        self._open: Optional[dict[str, Any]] = None
        self._seq = 0
        self._reason: Optional[str] = None
        return self

    # ---- the response object ----
    def response_object(self, items: list[dict[str, Any]], reason: Optional[str],
                        gen: Optional[Generation]) -> dict[str, Any]:
        r = self.request
        status = "in_progress" if gen is None else "incomplete" if reason == FINISH_LENGTH else "completed"
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "background": False, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": r.instructions, "max_output_tokens": r.max_output_tokens,
                "model": self.state.model_name, "output": items,
                "parallel_tool_calls": r.parallel_tool_calls is not False,
                "previous_response_id": r.previous_response_id,
                "reasoning": {"effort": r.effort, "summary": None},
                "store": r.store is not False, "temperature": r.temperature,
                "text": {"format": (r.text or {}).get("format") or {"type": "text"}},
                "tool_choice": r.tool_choice or "auto", "tools": r.tools or [], "top_p": r.top_p,
                "truncation": "disabled", "user": r.user, "metadata": r.metadata or {},
                "usage": None if gen is None else self.usage_of(gen, items)}

    def usage_of(self, gen: Generation, items: list[dict[str, Any]]) -> dict[str, Any]:
        p, c = self.token_counts(gen)
        thought = "".join(part["text"] for i in items if i["type"] == "reasoning" for part in i["content"])
        return {"input_tokens": p, "input_tokens_details": {"cached_tokens": sum(gen.cached_tokens),
                                                             "cache_write_tokens": 0},
                "output_tokens": c,
                # the reasoning text tokenized again: a count of its tokens, within the reply's
                "output_tokens_details": {"reasoning_tokens": min(c, len(self.state.tokenizer.encode(
                    thought, add_special_tokens=False))) if thought else 0},
                "total_tokens": p + c}

    def _finished(self, items: list[dict[str, Any]], reason: Optional[str], gen: Generation) -> dict[str, Any]:
        out = self.response_object(items, reason, gen)
        if self.request.store is not False:
            self.state.responses.put(out, [*self.history, *history_message(items)], self.inputs)
        return out

    def full_response(self, gen: Any, per_choice: list[list[Piece]]) -> dict[str, Any]:
        choice = super().full_response(gen, per_choice)["choices"][0]
        reason = choice["finish_reason"]
        return self._finished(output_items(choice["message"], reason != FINISH_LENGTH), reason, gen)

    # ---- the stream: chat chunks become typed events ----
    def encode_event(self, obj: Any) -> bytes:
        return b"event: " + obj["type"].encode() + b"\ndata: " + encode(obj) + b"\n\n"

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self._seq += 1
        return {"type": kind, "sequence_number": self._seq - 1, **fields}

    def head_chunks(self, index: int) -> list[dict[str, Any]]:
        snapshot = self.response_object([], None, None)
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def chunks(self, piece: Piece, offset: int) -> list[dict[str, Any]]:
        return [e for c in super().chunks(piece, offset) for e in self._from_chunk(c)]

    def final_chunks(self, index: int, reason: str) -> list[dict[str, Any]]:
        events = [e for c in super().final_chunks(index, reason) for e in self._from_chunk(c)]
        self._reason = reason
        return events + self._close()

    def error_event(self, err: APIError) -> bytes:
        """An error event, then response.failed with the output so far (not stored)."""
        failed = self.response_object(self._items, None, None)
        failed.update(status="failed", error={"code": "server_error", "message": err.message})
        return (self.encode_event(self._event("error", code=err.code or err.type, message=err.message,
                                              param=err.param))
                + self.encode_event(self._event("response.failed", response=failed)))

    def tail_events(self, gen: Generation) -> list[bytes]:
        out = self._finished(self._items, self._reason, gen)
        kind = "response.completed" if out["status"] == "completed" else "response.incomplete"
        return [self.encode_event(self._event(kind, response=out))]

    def _from_chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for choice in chunk.get("choices", []):
            delta = choice.get("delta") or {}
            if delta.get(REASONING):
                events += self._text_delta("reasoning", delta[REASONING])
            if delta.get("content"):
                events += self._text_delta("message", delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._call_delta(call)
        return events

    def _begin(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self._open = {**item, "text": ""}
        events.append(self._event("response.output_item.added", output_index=len(self._items),
                                  item=item))
        if item["type"] == "message":
            events.append(self._event("response.content_part.added", item_id=item["id"],
                                      output_index=len(self._items), content_index=0,
                                      part=output_text("")))
        return events

    def _text_delta(self, kind: str, text: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self._open is None or self._open["type"] != kind:
            events += self._begin({"type": "reasoning", "id": new_id("rs_"), "summary": [], "content": []}
                                  if kind == "reasoning" else
                                  {"type": "message", "id": new_id("msg_"), "status": "in_progress",
                                   "role": "assistant", "content": []})
        assert self._open is not None
        self._open["text"] += text
        where = dict(item_id=self._open["id"], output_index=len(self._items), content_index=0)
        if kind == "reasoning":
            return events + [self._event("response.reasoning_text.delta", **where, delta=text)]
        return events + [self._event("response.output_text.delta", **where, delta=text, logprobs=[])]

    def _call_delta(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        fn = call.get("function") or {}
        if call.get("id"):        # a new call: its id and name come first, then its arguments
            events += self._begin({"type": "function_call", "id": new_id("fc_"), "call_id": call["id"],
                                   "name": fn.get("name", ""), "arguments": "", "status": "in_progress"})
        args = fn.get("arguments") or ""
        if args and self._open is not None and self._open["type"] == "function_call":
            self._open["text"] += args
            events.append(self._event("response.function_call_arguments.delta",
                                      item_id=self._open["id"], output_index=len(self._items),
                                      delta=args))
        return events

    def _close(self) -> list[dict[str, Any]]:
        """End the open output item: its done events, and it joins the output."""
        item, self._open = self._open, None
        if item is None:
            return []
        status = "incomplete" if self._reason == FINISH_LENGTH else "completed"
        where = dict(item_id=item["id"], output_index=len(self._items))
        text = item["text"]
        if item["type"] == "reasoning":
            done = reasoning_item(text, item["id"])
            events = [self._event("response.reasoning_text.done", **where, content_index=0, text=text)]
        elif item["type"] == "message":
            done = message_item(text, status, item["id"])
            events = [self._event("response.output_text.done", **where, content_index=0, text=text,
                                  logprobs=[]),
                      self._event("response.content_part.done", **where, content_index=0,
                                  part=output_text(text))]
        else:
            done = call_item(item["call_id"], item["name"], text, status, item["id"])
            events = [self._event("response.function_call_arguments.done", **where,
                                  name=item["name"], arguments=text)]
        events.append(self._event("response.output_item.done", output_index=len(self._items), item=done))
        self._items.append(done)
        return events


async def create(state: ServerState, request: Request) -> Response:
    body = parse(ResponsesRequest, await read_json(request, state.cfg.max_request_bytes))
    check_supported(body)
    history: list[dict[str, Any]] = []
    inputs: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        prev = state.responses.get(body.previous_response_id)
        if prev is None:   # OpenAI's answer: a 400 with this code
            raise APIError(400, f"Previous response with id '{body.previous_response_id}' not "
                                f"found (this server keeps the last {state.cfg.responses_store} "
                                f"stored responses, in memory)", param="previous_response_id",
                           code="previous_response_not_found")
        history = list(prev.history)
        inputs = [*prev.inputs, *prev.response["output"]]
    history += input_messages(body.input)
    inputs += input_items(body.input)
    chat = {"model": body.model, "messages": with_instructions(body.instructions, history),
            "stream": body.stream,
            "max_tokens": body.max_output_tokens, "temperature": body.temperature,
            "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p, "seed": body.seed,
            "ignore_eos": body.ignore_eos, "logit_bias": body.logit_bias,
            "tools": chat_tools(body.tools), "tool_choice": chat_tool_choice(body.tool_choice),
            "parallel_tool_calls": body.parallel_tool_calls,
            "response_format": chat_response_format(body.text),
            "reasoning_effort": body.effort}
    if not chat["messages"]:
        raise APIError(400, "the input is empty", param="input")
    try:
        job = await chat_job(state, chat_request(chat), ResponsesJob)
    except APIError as exc:
        raise responses_param(exc) from None
    assert isinstance(job, ResponsesJob)
    return await respond(request, job.for_request(body, history, inputs))


def _stored(state: ServerState, response_id: str) -> Stored:
    entry = state.responses.get(response_id)
    if entry is None:
        raise APIError(404, f"No response with id '{response_id}' is stored here",
                       param="response_id", code="not_found")
    return entry


def add_responses_routes(app: FastAPI, state: ServerState) -> None:
    async def create_route(request: Request) -> Response:
        return await create(state, request)

    async def get_route(response_id: str) -> Response:
        return JSONBody(_stored(state, response_id).response)

    async def input_items_route(response_id: str, request: Request) -> Response:
        q = request.query_params
        limit = q.get("limit", "20")
        if not re.fullmatch(r"[0-9]{1,4}", limit):     # (str.isdigit takes "²")
            raise APIError(400, "limit must be an integer in 1..100", param="limit")
        return JSONBody(page(_stored(state, response_id).inputs, int(limit), q.get("order", "desc"),
                             q.get("after"), q.get("before")))

    async def delete_route(response_id: str) -> Response:
        _stored(state, response_id)
        state.responses.delete(response_id)
        return JSONBody({"id": response_id, "object": "response", "deleted": True})

    for prefix in ("/v1", ""):
        shown = prefix == "/v1"
        app.add_api_route(prefix + "/responses", create_route, methods=["POST"],
                          include_in_schema=shown, summary="Create a model response",
                          openapi_extra={**body_schema(ResponsesRequest), "responses": error_responses()})
        missing = {404: {"description": "no stored response has this id"}}
        app.add_api_route(prefix + "/responses/{response_id}", get_route, methods=["GET"],
                          include_in_schema=shown, summary="Get a stored response", responses=missing)
        app.add_api_route(prefix + "/responses/{response_id}/input_items", input_items_route,
                          methods=["GET"], include_in_schema=shown,
                          summary="List a stored response's input items", responses=missing)
        app.add_api_route(prefix + "/responses/{response_id}", delete_route, methods=["DELETE"],
                          include_in_schema=shown, summary="Delete a stored response",
                          responses=missing)
