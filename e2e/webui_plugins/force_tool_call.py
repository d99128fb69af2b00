"""
title: Force the first tool call
author: moeserve
description: Sends tool_choice "required" (or one named tool) with the request that answers a user message, for a model that does not choose a tool by itself; the request after a tool result goes without it, so that the model answers in text.
version: 0.1.0
"""
from pydantic import BaseModel, Field


class Filter:
    class Valves(BaseModel):
        priority: int = Field(default=0, description="Order among the model's filters.")
        tool_choice: str = Field(
            default="required",
            description='"required" (any of the chat\'s tools) or the name of the one tool to call.')
        one_call: bool = Field(
            default=True, description="parallel_tool_calls false with the forced request.")
        strict: bool = Field(
            default=True,
            description="The tools as OpenAI's strict mode has them: strict, no other properties.")

    def __init__(self) -> None:
        self.valves = self.Valves()

    def request(self, body: dict) -> dict:
        # Open WebUI runs request() just before each model request: the first one and each one
        # after a tool result (inlet() runs once, before the tools are added). Its tool loop
        # copies the first request's body, so what is set here must also be taken out again, or
        # every continuation would be forced into another call.
        messages = body.get("messages") or []
        if body.get("tools") and messages and messages[-1].get("role") == "user":
            choice = self.valves.tool_choice
            body["tool_choice"] = choice if choice in ("required", "auto", "none") else {
                "type": "function", "function": {"name": choice}}
            if self.valves.one_call:
                # a small model forced to call tends to go on calling for other arguments
                body["parallel_tool_calls"] = False
            if self.valves.strict:
                # Open WebUI's tool schemas allow extra properties, which a forced small model
                # invents; new dicts, as the specs are Open WebUI's own
                body["tools"] = [self._strict(t) for t in body["tools"]]
        else:
            body.pop("tool_choice", None)
            body.pop("parallel_tool_calls", None)
        return body

    @staticmethod
    def _strict(tool: dict) -> dict:
        fn = tool.get("function") if tool.get("type") == "function" else None
        if not isinstance(fn, dict):
            return tool
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if params.get("type") == "object":
            params = {"additionalProperties": False, **params}
        return {**tool, "function": {**fn, "strict": True, "parameters": params}}
