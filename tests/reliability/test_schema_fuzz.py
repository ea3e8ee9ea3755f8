"""Item 1: schemathesis against /openapi.json of the in-process app (two tiny presets, CPU).

Every operation gets positive (schema-valid) and negative (schema-violating) cases; positive bodies
name a served model half of the time so generation really runs. Checks: at least 1,000 requests in
all, no 5xx, every 4xx in OpenAI's error shape. Counts are printed (docs/reliability.md).
"""

from __future__ import annotations

import collections
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from modelhive.server.app import create_app  # noqa: E402
from tests.reliability.conftest import assert_openai_error, running_engine, tiny_specs  # noqa: E402

MODELS = ("tiny-llama", "tiny-qwen2")
EXAMPLES_PER_RUN = 120  # x (operation, mode); GET operations without inputs have one case
MIN_REQUESTS = 1000


#: what stays of a positive body when it is trimmed (the rest keep their schema-valid random values)
_KEPT = {"model", "prompt", "messages", "tokens", "max_tokens", "stream", "n", "seed", "stop",
         "temperature", "add_generation_prompt", "add_special_tokens"}


def _point_at_served_model(case, model: str | None, trim: bool) -> None:
    """Positive cases: most name a served model, so they get past 404 into generation; trimmed
    ones drop the fields most likely out of range, so generation really runs."""
    if model is not None and isinstance(case.body, dict):
        case.body["model"] = model
        if trim:
            for key in set(case.body) - _KEPT:
                del case.body[key]
            if isinstance(case.body.get("n"), int):
                case.body["n"] = 1 + case.body["n"] % 3
            if isinstance(case.body.get("temperature"), (int, float)):
                case.body["temperature"] = abs(case.body["temperature"]) % 2
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(key), int) and case.body[key] > 8:
                case.body[key] = 8  # keep generation short on a CPU
    if model is not None and "name" in (case.path_parameters or {}):
        case.path_parameters["name"] = model


def fuzz_operation(op, mode, statuses: collections.Counter, failures: list[str]) -> None:
    """Run EXAMPLES_PER_RUN generated cases of one operation in one mode through the app."""
    models = st.sampled_from([*MODELS, None]) if mode.is_positive else st.none()
    trims = st.booleans() if mode.is_positive else st.just(False)

    @given(case=op.as_strategy(generation_mode=mode), model=models, trim=trims)
    @settings(max_examples=EXAMPLES_PER_RUN, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def one_case(case, model, trim):
        _point_at_served_model(case, model, trim)
        response = case.call()
        sent = f"{case.path_parameters or ''} {str(case.body)[:200]}"
        statuses[(op.label, mode.value, response.status_code)] += 1
        if response.status_code >= 500:
            failures.append(f"{op.label} {sent} -> {response.status_code} {response.text[:300]}")
        elif response.status_code >= 400:
            try:
                assert_openai_error(response)
            except (AssertionError, ValueError) as exc:
                failures.append(f"{op.label} {sent} -> not OpenAI shape: {exc}")

    try:
        one_case()
    except Unsatisfiable:  # no way to violate an operation without inputs
        assert not mode.is_positive, op.label


def test_schemathesis_no_5xx_and_openai_error_shape():
    statuses: collections.Counter[tuple[str, str, int]] = collections.Counter()
    failures: list[str] = []
    started = time.monotonic()
    with running_engine(tiny_specs(max_model_len=64)) as engine:
        app = create_app(engine)
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 9, [op.label for op in operations]
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz_operation(op, mode, statuses, failures)
    total = sum(statuses.values())
    by_class = collections.Counter(f"{status // 100}xx" for (_, _, status) in statuses.elements())
    print(f"\nschemathesis: {total} requests over {len(operations)} operations in "
          f"{time.monotonic() - started:.1f} s; {dict(by_class)}; failures {len(failures)}")
    for key, count in sorted(statuses.items()):
        print(f"  {key}: {count}")
    assert not failures, "\n".join(failures[:20])
    assert total >= MIN_REQUESTS
    assert by_class["2xx"] >= 100  # generation really ran, not only rejections
