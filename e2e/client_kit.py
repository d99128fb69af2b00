"""What every client check shares: the results (Check, Run), the expectations and the schemas."""
from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(REPO, "bench", "results", "clients_check.json")
LOGS = os.path.join(REPO, "bench", "results", "clients_check-logs")
MAX_TOKENS = 48          # small on purpose: this is a protocol check on a shared CPU machine
TOOL_MAX_TOKENS = 64

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "the city", "maxLength": 20},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": WEATHER_SCHEMA}}
ASK_WEATHER = "What is the weather in Paris? Use the get_weather tool."
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}




@dataclass
class Check:
    client: str
    check: str
    ok: bool
    seconds: float
    error: Optional[str] = None
    detail: Optional[str] = None


@dataclass
class Run:
    base_url: str
    model: str
    checks: list[Check] = field(default_factory=list)

    def record(self, client: str, name: str, fn: Callable[[], Optional[str]]) -> None:
        t = time.perf_counter()
        try:
            detail = fn()
            c = Check(client, name, True, 0.0, detail=short(detail))
        except Exception as exc:   # a failing client is data, not a crash of the check
            tb = traceback.extract_tb(exc.__traceback__)
            where = next((f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(tb)
                          if os.path.dirname(f.filename) == HERE and f.filename != __file__), "")
            c = Check(client, name, False, 0.0, error=short(f"{type(exc).__name__}: {exc}"
                                                             + (f" [{where}]" if where else ""),
                                                             600))
        c.seconds = round(time.perf_counter() - t, 2)
        self.checks.append(c)
        mark = "ok  " if c.ok else "FAIL"
        print(f"  {mark} {client:10s} {name:28s} {c.seconds:6.1f}s  {c.error or c.detail or ''}",
              flush=True)


def short(text: Optional[str], n: int = 160) -> Optional[str]:
    if text is None:
        return None
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def check_weather_args(arguments: Any) -> dict[str, Any]:
    """Tool arguments (JSON text or a dict) that follow WEATHER_SCHEMA."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    expect(isinstance(args, dict), f"arguments are not an object: {arguments!r}")
    expect(isinstance(args.get("city"), str) and args.get("unit") in ("celsius", "fahrenheit")
           and set(args) == {"city", "unit"}, f"arguments do not follow the schema: {args!r}")
    return args


def check_person(obj: Any) -> dict[str, Any]:
    d = obj if isinstance(obj, dict) else obj.model_dump()
    expect(isinstance(d.get("name"), str) and isinstance(d.get("age"), int)
           and set(d) == {"name", "age"}, f"not a person: {d!r}")
    return d
