"""One retry layer: :class:`RetryPolicy`, built on tenacity.

Why this module exists: the SDK's ``Connector`` retries inside ``_query`` and
re-sends the same bytes even when the request had already reached the server,
so an ``AddEntity`` can run twice.  The pool turns that loop off and owns the
policy here, in one place.  As in urllib3's ``Retry``, the *class* of the
failure decides whether another attempt is safe:

* :class:`~aperturedb_pool.errors.ConnectFailed` - nothing reached the server:
  retried whenever ``retry_connect_errors`` is on.
* :class:`~aperturedb_pool.errors.OutcomeUnknown` (and its subclass
  :class:`~aperturedb_pool.errors.QueryTimeout`) - the request was sent and the
  outcome is unknown: retried only when the call is idempotent *and*
  ``retry_unknown_outcome`` is on.  Otherwise the query is never re-sent.
* anything else - other pool errors, ``ValueError``, ``KeyboardInterrupt``, a
  bare :class:`~aperturedb_pool.errors.ConnectorError`, an error marked
  ``permanent`` - propagates at once.  A response that reports a failed
  transaction is not an exception at all: it is returned as is.

Idempotency of a query is decided by :func:`is_read_only`; callers may also
declare it themselves.

The history of attempts travels with the error (urllib3 again): the error a
caller finally sees carries ``.attempts``, the earlier failures, oldest first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Final, TypeVar, cast

from tenacity import (
    DoAttempt,
    DoSleep,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from aperturedb_pool import _validate
from aperturedb_pool.errors import (
    ConnectFailed,
    ConnectorError,
    OutcomeUnknown,
    ServerUnreachable,
)

__all__ = [
    "READ_ONLY_COMMANDS",
    "READ_ONLY_PREFIXES",
    "FullJitterBackoff",
    "RetryPolicy",
    "idempotent",
    "is_read_only",
]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

#: Every retry is reported here, one WARNING line each.
logger = logging.getLogger("aperturedb_pool.retry")


# ---------------------------------------------------------------------------
# Which queries are safe to send twice
# ---------------------------------------------------------------------------

#: Commands known to never modify state.  Running any of them twice gives the
#: same database as running it once, so a query made only of these may be
#: re-sent after an unknown outcome.  ``Find*`` commands with ``operations``
#: (resize, crop, ...) transform the returned copy only, never the stored
#: object; ``ClassifyDescriptor`` is a k-nearest-neighbour lookup.
#:
#: Deliberately absent: ``Authenticate`` and ``RefreshToken`` (they create or
#: rotate session tokens, and the SDK runs them itself), ``GenerateToken``,
#: ``RegenerateToken``, ``CreateIndex``/``RemoveIndex`` and every ``Add*``,
#: ``Update*`` and ``Delete*`` command.
READ_ONLY_COMMANDS: Final[frozenset[str]] = frozenset(
    {
        "FindEntity",
        "FindConnection",
        "FindBlob",
        "FindImage",
        "FindVideo",
        "FindClip",
        "FindFrame",
        "FindDescriptor",
        "FindDescriptorSet",
        "FindBoundingBox",
        "FindPolygon",
        "ClassifyDescriptor",
        "GetStatus",
        "GetSchema",
        "GetIndexes",
        "GetUserDetails",
    }
)

#: ApertureDB's naming convention: a command called ``Find<Thing>`` or
#: ``Get<Thing>`` reads and never writes.  The rule covers commands newer than
#: :data:`READ_ONLY_COMMANDS` (the prefix must be followed by an upper-case
#: letter, so ``Find`` alone or ``Getaway`` do not match).
READ_ONLY_PREFIXES: Final[tuple[str, ...]] = ("Find", "Get")


def _is_read_only_command(name: str) -> bool:
    if name in READ_ONLY_COMMANDS:
        return True
    for prefix in READ_ONLY_PREFIXES:
        rest = name[len(prefix):]
        if name.startswith(prefix) and rest[:1].isupper() and rest.isalnum():
            return True
    return False


def _label(describe: str | Callable[[], str]) -> str:
    return describe if isinstance(describe, str) else describe()


def is_read_only(query: Any) -> bool:
    """True when every command of ``query`` only reads, so re-sending it is safe.

    ``query`` is what ``Connector.query`` accepts: a list of single-key
    ``{"Command": {...}}`` objects, or the JSON text of such a list (``str``,
    ``bytes`` or ``bytearray``).  A command is a read when it is listed in
    :data:`READ_ONLY_COMMANDS` or its name is ``Find``/``Get`` followed by an
    upper-case letter (see :data:`READ_ONLY_PREFIXES`).

    Anything this function cannot vouch for answers False, because a wrong True
    could run a write twice while a wrong False only costs a retry: malformed
    JSON, a non-list, an element that is not an object with exactly one string
    key whose value is an object, an unknown command - and the empty list,
    which is not a meaningful query.
    """
    if type(query) is not list:  # a list first: what nearly every caller passes
        if isinstance(query, (bytes, bytearray)):
            try:
                query = query.decode("utf-8")
            except UnicodeDecodeError:
                return False
        if isinstance(query, str):
            try:
                query = json.loads(query)
            except (ValueError, RecursionError):
                return False
        if not isinstance(query, (list, tuple)):
            return False
    if not query:
        return False
    for command in query:
        # ``type(x) is dict`` first: JSON-shaped queries are plain dicts, and
        # the Mapping check (an ABC) costs several times more.
        if not (type(command) is dict or isinstance(command, Mapping)) or len(command) != 1:
            return False
        ((name, body),) = command.items()
        if type(name) is not str and not isinstance(name, str):
            return False
        if not (type(body) is dict or isinstance(body, Mapping)):
            return False
        if name not in READ_ONLY_COMMANDS and not _is_read_only_command(name):
            return False
    return True


def idempotent(fn: F) -> F:
    """Mark ``fn`` as safe to run twice: sets ``fn.idempotent = True`` and returns ``fn``.

    ``ConnectionPool.run`` re-runs a callable after an unknown outcome only
    when it carries this mark; the pool cannot look inside a callable the way
    :func:`is_read_only` looks inside a query, so the author has to say so.
    """
    setattr(fn, "idempotent", True)  # noqa: B010 - a Callable type has no such attribute
    return fn


# ---------------------------------------------------------------------------
# Backoff
# ---------------------------------------------------------------------------


class FullJitterBackoff(wait_random_exponential):
    """tenacity's full-jitter wait (``wait_random_exponential``) with an optional seeded RNG.

    After the ``failures``-th consecutive failure the delay is drawn uniformly
    from ``[0, min(max_delay, initial_delay * multiplier ** (failures - 1))]``:
    tenacity's ``wait_random_exponential(multiplier=initial_delay,
    exp_base=multiplier, max=max_delay)``, whose ceiling (the exponential, its
    overflow and its cap) this class inherits unchanged.  Full jitter (rather
    than a fixed or "equal jitter" delay) spreads the retries of many clients
    that failed at the same moment - a server restart fails every pooled
    connection at once - so they do not come back in waves.

    The one addition is ``rng``: a ``random.Random`` makes the draw
    reproducible in tests.  Without one the ``random`` module's shared
    generator is used, as tenacity does: Python reseeds it in a forked child,
    so pre-fork web server workers do not all draw the same delays.  The pool
    uses the same class for its reconnect backoff (``reconnect_initial``,
    ``reconnect_max``, doubling).
    """

    def __init__(self, initial_delay: float, multiplier: float, max_delay: float,
                 rng: random.Random | None = None) -> None:
        super().__init__(multiplier=initial_delay, max=max_delay, exp_base=multiplier)
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.rng = rng

    def ceiling(self, failures: int) -> float:
        """The largest delay :meth:`compute` can return after ``failures`` failures."""
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures!r}")
        return float(wait_exponential.__call__(self, cast("RetryCallState",
                                                          _Failures(failures))))

    def compute(self, failures: int) -> float:
        """A jittered delay, in seconds, to wait after ``failures`` consecutive failures."""
        top = self.ceiling(failures)
        if top <= 0.0:
            return 0.0
        draw = self.rng.uniform(0.0, top) if self.rng is not None else random.uniform(0.0, top)
        return min(max(draw, 0.0), top)  # uniform() may round a hair outside its bounds

    def __call__(self, retry_state: RetryCallState) -> float:
        # tenacity asks for the wait after attempt N failed: N failures so far.
        return self.compute(retry_state.attempt_number)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(initial_delay={self.initial_delay!r}, "
                f"multiplier={self.exp_base!r}, max_delay={self.max_delay!r})")


class _Failures:
    """The one field of a ``RetryCallState`` that tenacity's exponential reads."""

    __slots__ = ("attempt_number",)

    def __init__(self, attempt_number: int) -> None:
        self.attempt_number = attempt_number


class _StopAtDeadline(stop_base):
    """Stop when the coming sleep would end at or after the deadline.

    tenacity's own ``stop_before_delay`` reads ``time.monotonic`` directly; this
    one uses the injected clock, so tests can run without sleeping.  tenacity
    computes the wait before it consults the stop, so ``upcoming_sleep`` is the
    sleep that would follow.
    """

    def __init__(self, deadline_at: float, clock: Callable[[], float]) -> None:
        self.deadline_at = deadline_at
        self.clock = clock

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.clock() + retry_state.upcoming_sleep >= self.deadline_at


# ---------------------------------------------------------------------------
# Keeping secrets out of log lines and messages
# ---------------------------------------------------------------------------

_SECRET_KEY = r"[\w-]*(?:token|password|passwd|secret|api[_-]?key)[\w-]*"
_SECRET_PAIR = re.compile(
    r"(?P<key>[\"']?" + _SECRET_KEY + r"[\"']?\s*[:=]\s*)"
    r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s,;}\])]+)",
    re.IGNORECASE,
)
_SECRET_WORDS = re.compile(r"(?i)\bbearer\s+\S+|\badb[a-z]?_[A-Za-z0-9_-]{4,}")
_MAX_REASON_CHARS = 300


def _hide_value(match: re.Match[str]) -> str:
    value = match.group("value")
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{match.group('key')}{quote}***{quote}"


def _scrub(text: str) -> str:
    """``text`` on one line, shortened, with token and password values masked.

    Exception messages may embed a query (an ``Authenticate`` carries a
    password) or a server answer (session tokens); log lines must not.
    """
    text = _SECRET_PAIR.sub(_hide_value, text)
    text = _SECRET_WORDS.sub("***", text)
    text = " ".join(text.split())
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return text


def _reason(exc: BaseException) -> str:
    message = _scrub(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _add_note(exc: BaseException, note: str) -> None:
    # BaseException.add_note exists from Python 3.11; on 3.10 the note is
    # dropped and the error is raised unchanged apart from ``attempts``.
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(note)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ---------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------


def check_policy(retry: object) -> RetryPolicy:
    """``retry`` if it is a :class:`RetryPolicy`; a ``TypeError`` naming the
    parameter otherwise (the one check of every ``retry=`` argument)."""
    if not isinstance(retry, RetryPolicy):
        raise TypeError(f"retry must be a RetryPolicy (or None for the pool's own), got "
                        f"{retry!r}")
    return retry


def _stopped(_state: RetryCallState) -> None:
    return None


def _check_number(name: str, value: object) -> float:
    if not _validate.is_number(value):
        raise TypeError(f"RetryPolicy.{name} must be a number, got {value!r}")
    assert isinstance(value, (int, float))
    return float(value)


@dataclass(frozen=True)
class RetryPolicy:
    """When and how often a call is attempted again - plain, immutable data.

    Two policies with the same fields are equal and hash alike, so a policy
    can be a dict key, a default argument or a module constant.  Derive
    variants with :meth:`with_`.

    Fields:

    * ``max_attempts``: attempts in total, the first one included; 1 means
      never retry (see :meth:`no_retry`).
    * ``deadline``: seconds for the whole call - every attempt and every
      sleep; None for no deadline.  No sleep ever ends past it: when the next
      backoff would, the call gives up at once.
    * ``initial_delay``, ``multiplier``, ``max_delay``: full-jitter
      exponential backoff; the n-th sleep is drawn from
      ``[0, min(max_delay, initial_delay * multiplier ** (n - 1))]``.
    * ``retry_connect_errors``: retry :class:`ConnectFailed` (nothing reached
      the server, always safe).
    * ``retry_unknown_outcome``: retry :class:`OutcomeUnknown`, only ever when
      the call is idempotent.
    """

    max_attempts: int = 4
    deadline: float | None = 30.0
    initial_delay: float = 0.05
    multiplier: float = 2.0
    max_delay: float = 2.0
    retry_connect_errors: bool = True
    retry_unknown_outcome: bool = True

    def __post_init__(self) -> None:
        # Validate here, once, so a bad value fails where the policy is made,
        # not in the middle of an outage.  Numbers are stored as float so
        # ``RetryPolicy(max_delay=2)`` and ``RetryPolicy(max_delay=2.0)`` look
        # the same in logs (they are already equal).
        if not _validate.is_int(self.max_attempts):
            raise TypeError(f"RetryPolicy.max_attempts must be an int, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ValueError(
                f"RetryPolicy.max_attempts must be >= 1 (attempts in total, 1 = never retry), "
                f"got {self.max_attempts!r}"
            )
        if self.deadline is not None:
            deadline = _check_number("deadline", self.deadline)
            if not (math.isfinite(deadline) and deadline > 0):
                raise ValueError(
                    f"RetryPolicy.deadline must be a positive finite number of seconds, "
                    f"or None for no deadline, got {self.deadline!r}"
                )
            object.__setattr__(self, "deadline", deadline)
        for name in ("initial_delay", "max_delay"):
            value = _check_number(name, getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"RetryPolicy.{name} must be a finite number of seconds >= 0, "
                    f"got {getattr(self, name)!r}"
                )
            object.__setattr__(self, name, value)
        multiplier = _check_number("multiplier", self.multiplier)
        if not (math.isfinite(multiplier) and multiplier >= 1):
            raise ValueError(
                f"RetryPolicy.multiplier must be a finite number >= 1 (1 = constant backoff), "
                f"got {self.multiplier!r}"
            )
        object.__setattr__(self, "multiplier", multiplier)
        for name in ("retry_connect_errors", "retry_unknown_outcome"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"RetryPolicy.{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def no_retry(cls) -> RetryPolicy:
        """A policy that makes one attempt: its failure propagates as itself.

        Never :class:`ServerUnreachable` - one refused connection does not
        prove the server is down, and a caller who opted out of retries wants
        the precise error.
        """
        return cls(max_attempts=1)

    def with_(self, **changes: Any) -> RetryPolicy:
        """A copy with ``changes`` applied (and validated); this policy is unchanged."""
        return dataclasses.replace(self, **changes)

    def is_retryable(self, exc: BaseException, *, idempotent: bool) -> bool:
        """Whether this policy allows another attempt after ``exc``.

        Only the error's class and the policy's switches decide; attempts and
        deadline are the stop condition's business.  ``idempotent`` says the
        call may safely run twice (see :func:`is_read_only`).
        """
        if not isinstance(exc, ConnectorError) or getattr(exc, "permanent", False):
            return False
        if isinstance(exc, ConnectFailed):
            return self.retry_connect_errors
        if isinstance(exc, OutcomeUnknown):
            return idempotent and self.retry_unknown_outcome
        return False  # an unclassified transport error: we cannot tell it is safe

    def backoff(self, failures: int, rng: random.Random | None = None) -> float:
        """A jittered delay in seconds after ``failures`` consecutive failures (>= 1)."""
        return self._wait(rng).compute(failures)

    def _wait(self, rng: random.Random | None) -> FullJitterBackoff:
        return FullJitterBackoff(self.initial_delay, self.multiplier, self.max_delay, rng)

    def call(
        self,
        fn: Callable[[float | None], T],
        *,
        idempotent: bool,
        describe: str | Callable[[], str] = "query",
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        on_retry: Callable[[int, BaseException, float], None] | None = None,
    ) -> T:
        """Run ``fn`` under this policy and return its result.

        ``fn(remaining)`` gets the seconds left until the deadline (None with no
        deadline), so it can bound its own waits - leasing a connector, reading
        the response - by it.  It is called again only after a failure that
        :meth:`is_retryable` accepts, after a backoff sleep that ends before the
        deadline.  Whatever ``fn`` returns is returned as is: a response that
        reports a failed transaction is an answer, not a transport failure.

        Each retry logs one WARNING line on ``aperturedb_pool.retry`` and then
        calls ``on_retry(attempt, error, delay)``, where ``attempt`` is the
        1-based number of the attempt that just failed; an exception raised by
        ``on_retry`` propagates.  ``describe`` names the call in log lines and
        messages; a callable is called only if a label is needed (after a
        failure), so a caller need not build one for every call.  ``sleep``, ``clock`` (default ``time.monotonic``) and
        ``rng`` exist so tests run without waiting.

        Errors:

        * an error the policy does not retry propagates at once.  If it is a
          :class:`ConnectorError`, its ``attempts`` is set to the earlier
          failures of this call (oldest first) and, on Python 3.11+, a note
          says why it was not retried - an :class:`OutcomeUnknown` of a call
          that is not idempotent is never re-sent.  Any other exception is
          left untouched.
        * when attempts or deadline run out, the last failure is raised with
          ``attempts`` set to the earlier ones - except when the last failure
          was a :class:`ConnectFailed` (the server could not be reached at the
          end) and the policy allows retries (``max_attempts > 1``): then
          :class:`ServerUnreachable` is raised from the last failure, its
          ``attempts`` holding every failure.
          With ``max_attempts == 1`` the ``ConnectFailed`` itself propagates.
        """
        clock_fn: Callable[[], float] = clock if clock is not None else time.monotonic
        started = clock_fn()
        # The first attempt runs bare: most calls succeed at once, and setting
        # up tenacity's loop costs more than a whole query's client CPU.  Its
        # failure is handed to resume(), which records it as tenacity's first
        # attempt.
        try:
            return fn(self.deadline)
        except ConnectorError as exc:
            first = exc
        return self.resume(first, fn, started=started, idempotent=idempotent,
                           describe=describe, sleep=sleep, clock=clock_fn, rng=rng,
                           on_retry=on_retry)

    def resume(
        self,
        first: ConnectorError,
        fn: Callable[[float | None], T],
        *,
        started: float,
        idempotent: bool,
        describe: str | Callable[[], str] = "query",
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        on_retry: Callable[[int, BaseException, float], None] | None = None,
    ) -> T:
        """Go on after a first attempt the caller ran itself, which failed with ``first``.

        For callers whose first attempt is inlined (``ConnectionPool.query``
        runs it without calling through this class): ``started`` is when that
        attempt began, on ``clock``; the deadline counts from it.  The rest is
        :meth:`call`'s contract: ``first`` is raised at once if the policy
        does not retry it, otherwise ``fn(remaining)`` is attempted again.

        The loop is tenacity's own: a ``Retrying`` with this policy's stop
        (attempts, and the deadline on the injected clock), wait
        (:class:`FullJitterBackoff`), retry predicate (:meth:`is_retryable`)
        and ``before_sleep`` callback, driven through ``Retrying.iter`` with
        ``first`` recorded as the outcome of attempt 1 (nothing is raised
        twice).  Only :class:`ConnectorError` is handed to tenacity; anything
        else ``fn`` raises (``KeyboardInterrupt``, tenacity's own ``TryAgain``)
        propagates as itself.
        """
        clock_fn: Callable[[], float] = clock if clock is not None else time.monotonic
        failures: list[ConnectorError] = [first]
        if self.max_attempts == 1 or not self.is_retryable(first, idempotent=idempotent):
            first.attempts = []
            _add_note(first, self._not_retried_note(first, idempotent,
                                                    _scrub(_label(describe))))
            raise first
        label = _scrub(_label(describe))
        deadline_at = None if self.deadline is None else started + self.deadline

        def log_retry(retry_state: RetryCallState) -> None:
            exc = failures[-1]  # the outcome tenacity just judged retryable
            attempt_number = retry_state.attempt_number
            delay = float(retry_state.upcoming_sleep)
            if deadline_at is None:
                left = ""
            else:
                left = f", {max(deadline_at - clock_fn(), 0.0):.3f} s left before the deadline"
            logger.warning(
                "retrying %s: attempt %d of %d failed with %s; next attempt in %.3f s%s",
                label, attempt_number, self.max_attempts, _reason(exc), delay, left,
            )
            if on_retry is not None:
                on_retry(attempt_number, exc, delay)

        stop: stop_base = stop_after_attempt(self.max_attempts)
        if deadline_at is not None:
            stop = stop | _StopAtDeadline(deadline_at, clock_fn)
        retrying = Retrying(
            sleep=sleep if sleep is not None else time.sleep,
            stop=stop,
            wait=self._wait(rng),
            retry=retry_if_exception(lambda exc: self.is_retryable(exc, idempotent=idempotent)),
            before_sleep=log_retry,
            # Out of attempts or time: iter() returns this callback's None
            # instead of raising tenacity's RetryError; handled below.
            retry_error_callback=_stopped,
        )
        retrying.begin()
        state = RetryCallState(retrying, fn, (), {})
        state.set_exception((type(first), first, first.__traceback__))
        refused: ConnectorError | None = None
        while True:
            try:
                action = retrying.iter(state)
            except ConnectorError as exc:
                # tenacity re-raises an outcome its retry predicate refused.
                refused = exc
                break
            if isinstance(action, DoSleep):
                state.prepare_for_next_attempt()
                retrying.sleep(float(action))
            elif isinstance(action, DoAttempt):
                remaining = None if deadline_at is None else deadline_at - clock_fn()
                if remaining is not None and remaining <= 0:
                    # The stop never schedules a sleep past the deadline, but
                    # a real sleep may overshoot: never hand ``fn`` a zero or
                    # negative budget (a zero socket timeout means
                    # non-blocking).  Give up with the previous failure.
                    break
                try:
                    return fn(remaining)
                except ConnectorError as exc:
                    failures.append(exc)
                    state.set_exception((type(exc), exc, exc.__traceback__))
            else:
                break  # the stop fired: _stopped's None

        # Raised here, outside any except block, so the error keeps its own
        # __cause__ and __context__.
        if refused is not None:
            refused.attempts = list(failures[:-1])
            _add_note(refused, self._not_retried_note(refused, idempotent, label))
            raise refused
        elapsed = clock_fn() - started
        last = failures[-1]
        last.attempts = list(failures[:-1])
        why = self._why_stopped(len(failures))
        if isinstance(last, ConnectFailed):
            # The call ends because the server could not be reached.  The one
            # place ServerUnreachable is raised (the pool's lease path reports
            # a wait that ended while the server was down as a ConnectFailed,
            # so it ends up here too).
            trailing = 1  # the failures since the last one that was not a ConnectFailed
            while trailing < len(failures) and isinstance(failures[-trailing - 1], ConnectFailed):
                trailing += 1
            tried = (_plural(trailing, "connection attempt") if trailing == len(failures) else
                     f"{_plural(len(failures), 'attempt')} (the last {trailing} to connect)")
            raise ServerUnreachable(
                f"{label}: could not reach the ApertureDB server: "
                f"{tried} failed in {elapsed:.2f} s "
                f"({why}); last error: {_reason(last)}. Check that the server is running "
                f"and reachable at the configured host and port (and not refusing "
                f"connections); to keep trying longer, raise RetryPolicy.deadline "
                f"or max_attempts.",
                attempts=failures,
            ) from last
        _add_note(
            last,
            f"aperturedb_pool: gave up on {label} after {_plural(len(failures), 'attempt')} "
            f"in {elapsed:.2f} s ({why}); the earlier failures are in .attempts.",
        )
        raise last

    def _why_stopped(self, attempts: int) -> str:
        if attempts >= self.max_attempts:
            return f"max_attempts={self.max_attempts} reached"
        return f"the next attempt would start past the deadline of {self.deadline:g} s"

    def _not_retried_note(self, exc: ConnectorError, idempotent: bool, label: str) -> str:
        prefix = f"aperturedb_pool: {label} was not retried: "
        if getattr(exc, "permanent", False):
            return prefix + "the error is permanent; retrying cannot help. Fix the cause first."
        if isinstance(exc, OutcomeUnknown):
            if not idempotent:
                return prefix + (
                    "it may already have run on the server, and it is not idempotent "
                    "(not every command is a read). Check the database before sending it "
                    "again; pass idempotent=True only if running it twice is harmless."
                )
            return prefix + (
                "its outcome is unknown and RetryPolicy.retry_unknown_outcome is off. "
                "Check the database before sending it again."
            )
        if isinstance(exc, ConnectFailed):
            return prefix + "RetryPolicy.retry_connect_errors is off."
        return prefix + "this kind of transport error is not known to be safe to retry."
