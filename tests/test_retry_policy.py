"""Unit tests of RetryPolicy and is_read_only: pure logic, no server, no real sleeping.

Every call injects a fake clock that advances only when the injected sleep is
called (or when a stand-in ``fn`` says it spent time), so deadlines are exact
and the whole module runs in well under a second of wall time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import pickle
import random
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tenacity import TryAgain

from aperturedb_pool.errors import (
    ConnectFailed,
    ConnectorError,
    OutcomeUnknown,
    PoolClosed,
    PoolTimeout,
    QueryTimeout,
    ServerUnreachable,
)
from aperturedb_pool.retry import (
    READ_ONLY_COMMANDS,
    FullJitterBackoff,
    RetryPolicy,
    idempotent,
    is_read_only,
)

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


class FakeTime:
    """A monotonic clock that moves only when someone sleeps or spends time."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        seconds = float(seconds)
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class Script:
    """A stand-in for the pool's attempt function.

    Each call records the ``remaining`` it was given, spends ``cost`` seconds
    of fake time and then raises or returns the next scripted outcome (the
    last one repeats forever).
    """

    def __init__(self, fake: FakeTime, outcomes: list[Any], cost: float = 0.0) -> None:
        self.fake = fake
        self.outcomes = list(outcomes)
        self.cost = cost
        self.remaining: list[float | None] = []
        self.raised: list[BaseException] = []

    @property
    def calls(self) -> int:
        return len(self.remaining)

    def __call__(self, remaining: float | None) -> Any:
        self.remaining.append(remaining)
        self.fake.now += self.cost
        index = min(len(self.remaining), len(self.outcomes)) - 1
        outcome = self.outcomes[index]
        if isinstance(outcome, type) and issubclass(outcome, BaseException):
            outcome = outcome(f"failure #{self.calls}")
        if isinstance(outcome, BaseException):
            self.raised.append(outcome)
            raise outcome
        return outcome


def run(policy: RetryPolicy, script: Script, *, idempotent: bool = True, **kwargs: Any) -> Any:
    return policy.call(script, idempotent=idempotent, sleep=script.fake.sleep,
                       clock=script.fake.clock, rng=random.Random(7), **kwargs)


class MaxRandom(random.Random):
    """Always draws the top of the range: exposes the backoff ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


RESPONSE: tuple[list[dict[str, Any]], list[bytes]] = (
    [{"FindEntity": {"status": 0, "returned": 0}}], [])


# ---------------------------------------------------------------------------
# the policy as plain data
# ---------------------------------------------------------------------------


def test_defaults_match_the_contract() -> None:
    p = RetryPolicy()
    assert (p.max_attempts, p.deadline, p.initial_delay, p.multiplier, p.max_delay) == (
        4, 30.0, 0.05, 2.0, 2.0)
    assert p.retry_connect_errors is True and p.retry_unknown_outcome is True
    assert RetryPolicy.no_retry() == RetryPolicy(max_attempts=1)


def test_equality_and_hash_are_by_value() -> None:
    assert RetryPolicy() == RetryPolicy()
    assert hash(RetryPolicy()) == hash(RetryPolicy())
    assert RetryPolicy(max_attempts=3) != RetryPolicy()
    assert len({RetryPolicy(), RetryPolicy(), RetryPolicy.no_retry()}) == 2
    # ints and floats of the same value make the same policy, shown as floats
    assert RetryPolicy(max_delay=2, deadline=30) == RetryPolicy()
    assert "max_delay=2.0" in repr(RetryPolicy(max_delay=2))


def test_immutable_and_with_returns_a_validated_copy() -> None:
    p = RetryPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_attempts = 10  # type: ignore[misc]
    q = p.with_(max_attempts=10, deadline=None)
    assert (q.max_attempts, q.deadline) == (10, None)
    assert p == RetryPolicy()  # unchanged
    with pytest.raises(ValueError, match="max_attempts"):
        p.with_(max_attempts=0)
    with pytest.raises(TypeError):
        p.with_(no_such_field=1)


def test_repr_names_every_field() -> None:
    text = repr(RetryPolicy())
    for field in dataclasses.fields(RetryPolicy):
        assert f"{field.name}=" in text


def test_pickle_round_trip() -> None:
    p = RetryPolicy(max_attempts=7, deadline=None, retry_unknown_outcome=False)
    assert pickle.loads(pickle.dumps(p)) == p


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_attempts", 0),
        ("max_attempts", -3),
        ("deadline", 0),
        ("deadline", -1.0),
        ("deadline", math.nan),
        ("deadline", math.inf),
        ("initial_delay", -0.1),
        ("initial_delay", math.nan),
        ("initial_delay", math.inf),
        ("max_delay", -1),
        ("max_delay", math.nan),
        ("multiplier", 0.5),
        ("multiplier", 0),
        ("multiplier", math.nan),
        ("multiplier", math.inf),
    ],
)
def test_bad_values_raise_valueerror_naming_field_and_value(field: str, value: Any) -> None:
    with pytest.raises(ValueError) as info:
        RetryPolicy(**{field: value})
    message = str(info.value)
    assert f"RetryPolicy.{field}" in message
    assert repr(value) in message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_attempts", 2.0),
        ("max_attempts", True),
        ("deadline", "30"),
        ("initial_delay", None),
        ("multiplier", False),
        ("retry_connect_errors", 1),
        ("retry_unknown_outcome", "yes"),
    ],
)
def test_wrong_types_raise_typeerror_naming_field(field: str, value: Any) -> None:
    with pytest.raises(TypeError, match=f"RetryPolicy.{field}"):
        RetryPolicy(**{field: value})


def test_edge_values_are_accepted() -> None:
    RetryPolicy(max_attempts=1, deadline=None, initial_delay=0, max_delay=0, multiplier=1)
    RetryPolicy(initial_delay=5.0, max_delay=1.0)  # the cap simply wins


# ---------------------------------------------------------------------------
# is_read_only
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        [{"FindEntity": {"with_class": "Person", "results": {"count": True}}}],
        [{"GetStatus": {}}],
        [{"GetSchema": {}}],
        [{"FindImage": {"_ref": 1, "operations": [{"type": "resize", "width": 10}]}},
         {"FindBoundingBox": {"image_ref": 1}}],
        [{"FindVideo": {"_ref": 1}}, {"FindClip": {"video_ref": 1}},
         {"FindFrame": {"video_ref": 1}}],
        [{"FindDescriptorSet": {}}, {"FindDescriptor": {"set": "s", "k_neighbors": 3}},
         {"ClassifyDescriptor": {"set": "s", "k_neighbors": 3}}],
        [{"FindBlob": {"blobs": True}}, {"FindConnection": {}}, {"FindPolygon": {}}],
        [{"GetIndexes": {}}, {"GetUserDetails": {"username": "admin"}}],
        # the prefix rule covers read commands newer than the explicit list
        [{"FindWidget": {}}, {"GetMetrics": {}}],
        ({"FindEntity": {}},),  # a tuple is a list too
        '[{"FindEntity": {"with_class": "Person"}}, {"GetStatus": {}}]',
        b'[{"FindBlob": {}}]',
    ],
)
def test_reads_are_read_only(query: Any) -> None:
    assert is_read_only(query) is True


@pytest.mark.parametrize(
    "query",
    [
        [{"AddEntity": {"class": "Person"}}],
        [{"UpdateEntity": {"with_class": "Person", "properties": {"a": 1}}}],
        [{"DeleteEntity": {"with_class": "Person"}}],
        [{"FindEntity": {"_ref": 1}}, {"UpdateEntity": {"ref": 1}}],  # mixed
        [{"FindEntity": {"_ref": 1}}, {"AddConnection": {"src": 1, "dst": 1}}],
        [{"AddBlob": {}}, {"FindBlob": {}}],
        [{"Authenticate": {"username": "u", "password": "p"}}],
        [{"RefreshToken": {"refresh_token": "rt"}}],
        [{"GenerateToken": {}}],
        [{"RegenerateToken": {}}],
        [{"CreateIndex": {"index_type": "entity"}}],
        [{"UnknownCommand": {}}],
        '[{"AddEntity": {"class": "Person"}}]',
    ],
)
def test_writes_and_session_commands_are_not_read_only(query: Any) -> None:
    assert is_read_only(query) is False


@pytest.mark.parametrize(
    "query",
    [
        [],
        "[]",
        "",
        "not json",
        '{"FindEntity": {}}',  # an object, not a list
        b"\xff\xfe",
        None,
        42,
        {"FindEntity": {}},
        [{}],
        [{"FindEntity": {}, "GetStatus": {}}],  # two commands in one element
        [{"FindEntity": None}],
        [{"FindEntity": []}],
        [{"FindEntity": "x"}],
        [["FindEntity", {}]],
        ["FindEntity"],
        [{1: {}}],
        [{"Find": {}}],  # a prefix alone is no command
        [{"Getaway": {}}],
        [{"findentity": {}}],
        [{"Find Entity": {}}],
        [{"FindEntity": {}}, None],
    ],
)
def test_malformed_queries_are_not_read_only(query: Any) -> None:
    assert is_read_only(query) is False


def test_read_only_commands_list_holds_only_reads() -> None:
    for name in READ_ONLY_COMMANDS:
        assert is_read_only([{name: {}}])
        assert not name.startswith(("Add", "Update", "Delete"))
    assert {"Authenticate", "RefreshToken", "RegenerateToken"}.isdisjoint(READ_ONLY_COMMANDS)
    assert {"FindEntity", "FindBlob", "FindImage", "FindVideo", "FindDescriptor",
            "FindDescriptorSet", "FindConnection", "FindBoundingBox", "FindPolygon",
            "FindClip", "FindFrame", "GetStatus", "GetSchema"} <= READ_ONLY_COMMANDS


def test_json_string_and_list_agree() -> None:
    queries: list[list[dict[str, Any]]] = [[{"FindEntity": {}}], [{"AddEntity": {}}], [{"GetStatus": {}}, {"DeleteBlob": {}}]]
    for q in queries:
        assert is_read_only(json.dumps(q)) == is_read_only(q)


def test_idempotent_decorator_marks_and_returns_the_function() -> None:
    def read_twice(conn: Any) -> int:
        return 1

    assert getattr(read_twice, "idempotent", False) is False
    assert idempotent(read_twice) is read_twice
    assert getattr(read_twice, "idempotent", False) is True


# ---------------------------------------------------------------------------
# is_retryable: the error class decides
# ---------------------------------------------------------------------------


def test_is_retryable_by_class_and_switches() -> None:
    p = RetryPolicy()
    assert p.is_retryable(ConnectFailed("x"), idempotent=False)
    assert p.is_retryable(ConnectFailed("x"), idempotent=True)
    assert p.is_retryable(OutcomeUnknown("x"), idempotent=True)
    assert p.is_retryable(QueryTimeout("x"), idempotent=True)
    assert not p.is_retryable(OutcomeUnknown("x"), idempotent=False)
    assert not p.is_retryable(QueryTimeout("x"), idempotent=False)
    assert not p.is_retryable(ConnectorError("x"), idempotent=True)
    for exc in (PoolTimeout("x"), PoolClosed("x"), ServerUnreachable("x"), ValueError("x"),
                OSError("x"), KeyboardInterrupt()):
        assert not p.is_retryable(exc, idempotent=True)
    assert not p.with_(retry_connect_errors=False).is_retryable(ConnectFailed("x"), idempotent=True)
    assert not p.with_(retry_unknown_outcome=False).is_retryable(
        OutcomeUnknown("x"), idempotent=True)


def test_permanent_errors_are_never_retried() -> None:
    exc = ConnectFailed("bad credentials")
    exc.permanent = True  # e.g. authentication refused: retrying cannot help
    assert not RetryPolicy().is_retryable(exc, idempotent=True)
    fake = FakeTime()
    script = Script(fake, [exc, RESPONSE])
    with pytest.raises(ConnectFailed) as info:
        run(RetryPolicy(), script)
    assert info.value is exc and script.calls == 1 and fake.sleeps == []


# ---------------------------------------------------------------------------
# call: what is retried
# ---------------------------------------------------------------------------


def test_success_first_time_needs_no_sleep() -> None:
    fake = FakeTime()
    script = Script(fake, [RESPONSE])
    assert run(RetryPolicy(), script) is RESPONSE
    assert script.calls == 1 and fake.sleeps == []


def test_connect_failures_are_retried_until_success() -> None:
    fake = FakeTime()
    script = Script(fake, [ConnectFailed, ConnectFailed, ConnectFailed, RESPONSE])
    retries: list[tuple[int, BaseException, float]] = []
    result = run(RetryPolicy(), script, idempotent=False,
                 on_retry=lambda n, e, d: retries.append((n, e, d)))
    assert result is RESPONSE
    assert script.calls == 4
    assert [n for n, _, _ in retries] == [1, 2, 3]
    assert [e for _, e, _ in retries] == script.raised
    assert [d for _, _, d in retries] == fake.sleeps


def test_failed_transaction_response_is_returned_not_retried() -> None:
    fake = FakeTime()
    failed: tuple[dict[str, Any], list[bytes]] = ({"status": -1, "info": "transaction failed"}, [])
    script = Script(fake, [failed])
    assert run(RetryPolicy(), script) is failed
    assert script.calls == 1


def test_unknown_outcome_retried_when_idempotent() -> None:
    fake = FakeTime()
    script = Script(fake, [OutcomeUnknown, QueryTimeout, RESPONSE])
    assert run(RetryPolicy(), script, idempotent=True) is RESPONSE
    assert script.calls == 3


@pytest.mark.parametrize("error", [OutcomeUnknown, QueryTimeout])
def test_unknown_outcome_never_resent_when_not_idempotent(error: type[OutcomeUnknown]) -> None:
    fake = FakeTime()
    script = Script(fake, [error, RESPONSE])
    with pytest.raises(error) as info:
        run(RetryPolicy(), script, idempotent=False)
    assert script.calls == 1
    assert fake.sleeps == []
    assert info.value is script.raised[0]
    assert info.value.attempts == []
    notes = " ".join(getattr(info.value, "__notes__", []))
    if hasattr(info.value, "add_note"):
        assert "not idempotent" in notes and "idempotent=True" in notes


def test_unknown_outcome_after_connect_retries_carries_history() -> None:
    fake = FakeTime()
    script = Script(fake, [ConnectFailed, ConnectFailed, OutcomeUnknown, RESPONSE])
    with pytest.raises(OutcomeUnknown) as info:
        run(RetryPolicy(), script, idempotent=False)
    assert script.calls == 3
    assert info.value.attempts == script.raised[:2]


def test_retry_unknown_outcome_switch() -> None:
    fake = FakeTime()
    script = Script(fake, [QueryTimeout, RESPONSE])
    with pytest.raises(QueryTimeout):
        run(RetryPolicy(retry_unknown_outcome=False), script, idempotent=True)
    assert script.calls == 1


def test_retry_connect_errors_switch() -> None:
    fake = FakeTime()
    script = Script(fake, [ConnectFailed, RESPONSE])
    with pytest.raises(ConnectFailed) as info:
        run(RetryPolicy(retry_connect_errors=False), script)
    assert script.calls == 1 and info.value.attempts == []


def test_bare_connector_error_is_not_retried() -> None:
    fake = FakeTime()
    script = Script(fake, [ConnectorError, RESPONSE])
    with pytest.raises(ConnectorError):
        run(RetryPolicy(), script)
    assert script.calls == 1


@pytest.mark.parametrize(
    "error",
    [PoolTimeout("no connector"), PoolClosed("closed"), ValueError("bad query"),
     ServerUnreachable("down"), KeyboardInterrupt(), OSError("raw socket error")],
)
def test_other_errors_propagate_at_once_untouched(error: BaseException) -> None:
    fake = FakeTime()
    script = Script(fake, [error, RESPONSE])
    with pytest.raises(type(error)) as info:
        run(RetryPolicy(), script)
    assert info.value is error
    assert script.calls == 1 and fake.sleeps == []
    assert getattr(error, "__notes__", None) is None
    assert error.__cause__ is None and error.__context__ is None


def test_other_error_after_retries_is_still_untouched() -> None:
    fake = FakeTime()
    error = PoolTimeout("no connector became available")
    script = Script(fake, [ConnectFailed, error])
    with pytest.raises(PoolTimeout) as info:
        run(RetryPolicy(), script)
    assert info.value is error and script.calls == 2
    assert not hasattr(error, "attempts")


def test_tenacity_tryagain_from_fn_is_not_retried() -> None:
    # tenacity retries TryAgain whatever the predicate says; the policy must not.
    fake = FakeTime()
    error = TryAgain()
    script = Script(fake, [error, RESPONSE])
    with pytest.raises(TryAgain) as info:
        run(RetryPolicy(), script)
    assert info.value is error and script.calls == 1


def test_no_retry_policy_makes_one_attempt_and_keeps_the_error() -> None:
    fake = FakeTime()
    script = Script(fake, [ConnectFailed, RESPONSE])
    with pytest.raises(ConnectFailed) as info:
        run(RetryPolicy.no_retry(), script)
    assert not isinstance(info.value, ServerUnreachable)
    assert script.calls == 1 and fake.sleeps == [] and info.value.attempts == []


# ---------------------------------------------------------------------------
# giving up: history, ServerUnreachable
# ---------------------------------------------------------------------------


def test_give_up_after_max_attempts_raises_last_error_with_history() -> None:
    fake = FakeTime()
    script = Script(fake, [ConnectFailed, QueryTimeout, OutcomeUnknown, QueryTimeout])
    with pytest.raises(QueryTimeout) as info:
        run(RetryPolicy(max_attempts=4), script, idempotent=True)
    assert script.calls == 4
    assert info.value is script.raised[-1]
    assert info.value.attempts == script.raised[:-1]  # oldest first
    assert len(fake.sleeps) == 3  # no sleep after the last attempt


def test_persistent_connect_failures_raise_server_unreachable() -> None:
    fake = FakeTime()
    script = Script(fake, [ConnectFailed])
    with pytest.raises(ServerUnreachable) as info:
        run(RetryPolicy(max_attempts=5, deadline=None), script, describe="FindEntity query")
    err = info.value
    assert isinstance(err, TimeoutError)
    assert script.calls == 5
    assert err.attempts == script.raised  # every failure, oldest first
    assert err.__cause__ is script.raised[-1]
    last = script.raised[-1]
    assert isinstance(last, ConnectFailed) and last.attempts == script.raised[:-1]
    message = str(err)
    assert "FindEntity query" in message
    assert "5 connection attempts" in message
    assert "max_attempts=5" in message
    assert "ConnectFailed: failure #5" in message
    assert "deadline" in message  # says what to change


def test_a_call_that_ends_unable_to_connect_is_server_unreachable_with_all_failures() -> None:
    # A read's connection dropped (retried), then the server could not be
    # reached again: the call failed because the server is unreachable.
    fake = FakeTime()
    script = Script(fake, [QueryTimeout, OutcomeUnknown, ConnectFailed, ConnectFailed])
    with pytest.raises(ServerUnreachable) as info:
        run(RetryPolicy(max_attempts=4, deadline=None), script, idempotent=True)
    assert info.value.attempts == script.raised
    assert info.value.__cause__ is script.raised[-1]
    assert "4 attempts (the last 2 to connect)" in str(info.value)
    # A call whose last failure reached the server is not: its own error.
    script = Script(fake, [ConnectFailed, ConnectFailed, QueryTimeout])
    with pytest.raises(QueryTimeout):
        run(RetryPolicy(max_attempts=3, deadline=None), script, idempotent=True)


def test_server_unreachable_at_the_deadline() -> None:
    fake = FakeTime()
    policy = RetryPolicy(max_attempts=1000, deadline=5.0, initial_delay=0.1, max_delay=1.0)
    script = Script(fake, [ConnectFailed], cost=0.01)
    start = fake.now
    with pytest.raises(ServerUnreachable) as info:
        run(policy, script)
    assert "past the deadline of 5 s" in str(info.value)
    assert len(info.value.attempts) == script.calls > 5
    assert fake.now - start <= 5.0 + policy.max_delay


def test_server_unreachable_message_hides_secrets() -> None:
    fake = FakeTime()
    script = Script(fake, [ConnectFailed("refused; token=abc123 password: 'hunter2'")])
    with pytest.raises(ServerUnreachable) as info:
        run(RetryPolicy(max_attempts=2), script)
    assert "abc123" not in str(info.value) and "hunter2" not in str(info.value)


# ---------------------------------------------------------------------------
# deadline
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cost", [0.0, 0.07, 0.4])
def test_no_sleep_crosses_the_deadline(cost: float) -> None:
    fake = FakeTime()
    policy = RetryPolicy(max_attempts=10_000, deadline=3.0, initial_delay=0.05, max_delay=0.5)
    script = Script(fake, [ConnectFailed], cost=cost)
    start = fake.now
    deadline_at = start + 3.0
    sleep_ends: list[float] = []

    def sleep(seconds: float) -> None:
        fake.sleep(seconds)
        sleep_ends.append(fake.now)

    with pytest.raises(ServerUnreachable):
        policy.call(script, idempotent=True, sleep=sleep, clock=fake.clock,
                    rng=random.Random(3))
    assert sleep_ends and all(end < deadline_at for end in sleep_ends)
    # it gave up within one backoff step (plus the last attempt's own time)
    assert fake.now <= deadline_at + policy.max_delay + cost
    assert fake.now >= deadline_at - policy.max_delay - cost


def test_fn_receives_decreasing_remaining_time() -> None:
    fake = FakeTime()
    script = Script(fake, [ConnectFailed] * 5 + [RESPONSE], cost=0.25)
    policy = RetryPolicy(max_attempts=6, deadline=10.0)
    assert run(policy, script) is RESPONSE
    remaining = [r for r in script.remaining if isinstance(r, float)]
    assert len(remaining) == script.calls == 6
    assert remaining[0] == pytest.approx(10.0)
    assert all(r > 0 for r in remaining)
    assert all(a > b for a, b in itertools.pairwise(remaining))
    # exactly the time spent so far: attempts and sleeps
    spent = 0.25 * 5 + sum(fake.sleeps)
    assert remaining[-1] == pytest.approx(10.0 - spent)


def test_no_deadline_passes_none() -> None:
    fake = FakeTime()
    script = Script(fake, [ConnectFailed, RESPONSE])
    assert run(RetryPolicy(deadline=None), script) is RESPONSE
    assert script.remaining == [None, None]


def test_overlong_sleep_gives_up_instead_of_a_zero_budget_attempt() -> None:
    # A real sleep can overshoot; the next attempt must not get remaining <= 0.
    fake = FakeTime()
    script = Script(fake, [ConnectFailed, RESPONSE])
    policy = RetryPolicy(deadline=1.0, initial_delay=0.1)

    def oversleep(seconds: float) -> None:
        fake.now += float(seconds) + 5.0

    with pytest.raises(ServerUnreachable) as info:
        policy.call(script, idempotent=True, sleep=oversleep, clock=fake.clock)
    assert script.calls == 1
    assert info.value.attempts == script.raised


def test_slow_attempt_past_the_deadline_is_not_followed_by_another() -> None:
    fake = FakeTime()
    script = Script(fake, [QueryTimeout, RESPONSE], cost=2.0)
    with pytest.raises(QueryTimeout) as info:
        run(RetryPolicy(deadline=1.5), script, idempotent=True)
    assert script.calls == 1 and fake.sleeps == []
    notes = " ".join(getattr(info.value, "__notes__", []))
    if hasattr(info.value, "add_note"):
        assert "gave up" in notes and "deadline" in notes


# ---------------------------------------------------------------------------
# backoff
# ---------------------------------------------------------------------------


def test_backoff_ceiling_grows_exponentially_up_to_the_cap() -> None:
    p = RetryPolicy(initial_delay=0.05, multiplier=2.0, max_delay=2.0)
    top = [p.backoff(n, MaxRandom()) for n in range(1, 10)]
    assert top == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])


def test_backoff_is_jittered() -> None:
    p = RetryPolicy()
    rng = random.Random(42)
    for failures in (1, 3, 8):
        draws = [p.backoff(failures, rng) for _ in range(50)]
        assert len(set(draws)) > 40
        ceiling = min(p.max_delay, p.initial_delay * p.multiplier ** (failures - 1))
        assert all(0 <= d <= ceiling for d in draws)
        # full jitter: the draws spread over the whole range
        assert min(draws) < ceiling * 0.25 and max(draws) > ceiling * 0.75


def test_backoff_grows_on_average() -> None:
    p = RetryPolicy(initial_delay=0.01, multiplier=2.0, max_delay=100.0)
    rng = random.Random(1)
    means = [sum(p.backoff(n, rng) for _ in range(400)) / 400 for n in range(1, 8)]
    assert all(b > a * 1.5 for a, b in itertools.pairwise(means))


def test_backoff_with_default_rng_and_edge_cases() -> None:
    p = RetryPolicy()
    assert 0 <= p.backoff(1) <= p.initial_delay
    assert RetryPolicy(initial_delay=0).backoff(5) == 0.0
    assert RetryPolicy(max_delay=0).backoff(5) == 0.0
    assert RetryPolicy(multiplier=1.0).backoff(50, MaxRandom()) == p.initial_delay
    assert RetryPolicy(multiplier=10.0).backoff(10_000, MaxRandom()) == p.max_delay  # no overflow
    with pytest.raises(ValueError, match="failures"):
        p.backoff(0)


@settings(max_examples=300, deadline=None)
@given(
    initial=st.floats(min_value=0, max_value=100, allow_nan=False),
    multiplier=st.floats(min_value=1, max_value=1e6, allow_nan=False, allow_infinity=False),
    cap=st.floats(min_value=0, max_value=1e4, allow_nan=False),
    failures=st.integers(min_value=1, max_value=10_000),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_backoff_always_within_zero_and_cap(initial: float, multiplier: float, cap: float,
                                            failures: int, seed: int) -> None:
    p = RetryPolicy(initial_delay=initial, multiplier=multiplier, max_delay=cap)
    delay = p.backoff(failures, random.Random(seed))
    assert 0.0 <= delay <= cap
    assert delay <= FullJitterBackoff(initial, multiplier, cap).ceiling(failures)
    assert not math.isnan(delay)


def test_call_sleeps_are_the_policy_backoff() -> None:
    fake = FakeTime()
    policy = RetryPolicy(max_attempts=8, deadline=None)
    script = Script(fake, [ConnectFailed] * 7 + [RESPONSE])
    policy.call(script, idempotent=True, sleep=fake.sleep, clock=fake.clock, rng=MaxRandom())
    assert fake.sleeps == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0])
    # and the same seed gives the same jittered sleeps
    runs = []
    for _ in range(2):
        fake = FakeTime()
        script = Script(fake, [ConnectFailed] * 7 + [RESPONSE])
        policy.call(script, idempotent=True, sleep=fake.sleep, clock=fake.clock,
                    rng=random.Random(9))
        runs.append(fake.sleeps)
    assert runs[0] == runs[1] and len(set(runs[0])) == 7


# ---------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------


def test_each_retry_logs_one_warning_without_secrets(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeTime()
    secret_error = ConnectFailed(
        'refused while sending [{"Authenticate": {"username": "admin", "password": "hunter2"}}] '
        "session_token=s3cr3tT0k3n refresh_token: 'r3fr3sh'\nsecond line"
    )
    script = Script(fake, [secret_error, QueryTimeout("no response in 2.0 s"), RESPONSE])
    with caplog.at_level(logging.DEBUG, logger="aperturedb_pool.retry"):
        run(RetryPolicy(), script, describe="FindEntity query")
    records = [r for r in caplog.records if r.name == "aperturedb_pool.retry"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]
    first, second = (r.getMessage() for r in records)
    for line in (first, second):
        assert "\n" not in line
        assert "FindEntity query" in line
    assert "attempt 1 of 4" in first and "attempt 2 of 4" in second
    assert "ConnectFailed: refused" in first
    assert "QueryTimeout: no response in 2.0 s" in second
    assert f"{fake.sleeps[0]:.3f} s" in first and f"{fake.sleeps[1]:.3f} s" in second
    for secret in ("hunter2", "s3cr3tT0k3n", "r3fr3sh"):
        assert secret not in caplog.text
    assert "second line" in first  # the message is kept, on one line


def test_no_log_when_nothing_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeTime()
    with caplog.at_level(logging.DEBUG, logger="aperturedb_pool.retry"):
        run(RetryPolicy(), Script(fake, [RESPONSE]))
        with pytest.raises(OutcomeUnknown):
            run(RetryPolicy(), Script(fake, [OutcomeUnknown]), idempotent=False)
    assert [r for r in caplog.records if r.name == "aperturedb_pool.retry"] == []


def test_on_retry_errors_propagate() -> None:
    fake = FakeTime()

    def broken(attempt: int, exc: BaseException, delay: float) -> None:
        raise RuntimeError("counter broke")

    with pytest.raises(RuntimeError, match="counter broke"):
        run(RetryPolicy(), Script(fake, [ConnectFailed, RESPONSE]), on_retry=broken)


# ---------------------------------------------------------------------------
# one policy, many threads
# ---------------------------------------------------------------------------


def test_one_policy_shared_by_threads() -> None:
    policy = RetryPolicy(max_attempts=5)
    results: list[Any] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        fake = FakeTime()
        outcomes: list[Any] = [ConnectFailed] * (i % 4) + [("ok", i)]
        script = Script(fake, outcomes)
        try:
            results.append(policy.call(script, idempotent=False, sleep=fake.sleep,
                                       clock=fake.clock))
            assert script.calls == i % 4 + 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [("ok", i) for i in range(16)]
