"""Schemathesis against the served /openapi.json of a real server: every check, a bounded number
of examples per operation (MOESERVE_FUZZ_EXAMPLES, default 12; `make fuzz` runs many more).
The server must never answer 5xx, whatever it is sent.

Every check runs but positive_data_acceptance: a schema-valid request may still be refused for
what no JSON schema says (a prompt over the context, a message the chat template rejects, more
generations than --max-queue), and those 400s are right. The operations are driven with
hypothesis directly (schemathesis' pytest plugin does not run under pytest 9 yet)."""
from __future__ import annotations

import collections
import os
import sys

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from tests.server.conftest import ServerProcess

schemathesis = pytest.importorskip("schemathesis")

from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

EXAMPLES = int(os.environ.get("MOESERVE_FUZZ_EXAMPLES", "12"))
# CI keeps generations short (valid bodies ask for up to 64 x 256 tokens); `make fuzz` does not
CHEAP = os.environ.get("MOESERVE_FUZZ_FULL", "") != "1"


def _cheapen(body: object) -> None:
    if not isinstance(body, dict):
        return
    for key, most in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2)):
        if isinstance(body.get(key), (int, float)) and not isinstance(body[key], bool) \
                and body[key] > most:
            body[key] = most


def test_api_conforms_and_never_answers_5xx(server: ServerProcess) -> None:
    schema = schemathesis.openapi.from_url(server.base + "/openapi.json")
    statuses: collections.Counter[int] = collections.Counter()
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 5
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def run(case: object) -> None:
            if CHEAP:
                _cheapen(case.body)   # type: ignore[attr-defined]
            response = case.call_and_validate(   # type: ignore[attr-defined]
                timeout=120, excluded_checks=[positive_data_acceptance])
            statuses[response.status_code] += 1
        run()
    print(f"fuzz: {sum(statuses.values())} requests over {len(operations)} operations, "
          f"statuses {dict(sorted(statuses.items()))}", file=sys.stderr)
    assert not [s for s in statuses if s >= 500]
