"""HTTP delivery: one POST of one batch, signed, retried, and told as an `Outcome`.

Delivery
--------
Each batch is one HTTP POST of a JSON body. The result is one of three:

* **accepted** - the endpoint answered 2xx (for WeCom: HTTP 200 *and* ``errcode`` 0).
* **gone** - the endpoint answered ``410 Gone``: it asks to be sent nothing more. Nothing
  is retried; the webhook endpoint should be disabled until an operator re-enables it.
* **failed** - anything else, marked *retryable* (a later export may try again) or not
  (the request itself is wrong: fix the URL, the secret or the data first).

Retries happen within one export run, for answers that may go away by themselves:

* ``429 Too Many Requests`` and ``5xx``, timeouts and connection errors are retried, up to
  ``max_attempts`` attempts in all (5 by default).
* A ``Retry-After`` header (seconds or an HTTP date, usually on 429 and 503) is obeyed to
  the second. If it asks for more than ``max_retry_after`` (300 s) the batch is not
  waited for: it fails as retryable, with the wait it asked for in the reason.
* Otherwise the wait before attempt *k + 1* is "full jitter" exponential backoff: a random
  time between 0 and ``min(max_backoff, backoff * 2**(k - 1))`` seconds (0.5 s doubling,
  at most 60 s by default), so many senders do not retry in step.
* ``408`` is retried too; every other ``4xx`` and every ``3xx`` fails at once and is not
  retryable (redirects are not followed: put the final URL in the settings).
* Each attempt waits at most ``timeout`` seconds (10 by default) to connect, to send, and
  between two reads of the answer.
* WeCom answers HTTP 200 even when it refuses: ``errcode`` -1 (system busy), 45009 (API
  frequency limit) and 45033 (too many concurrent calls) are retried like a 5xx; every
  other non-zero ``errcode`` fails, not retryable, as ``WeCom errcode N: errmsg``.

Error texts name the status code or the exception class in one line. Query values that
are credentials (``access_token=``, ``key=``, ``secret=``, ...) are shown as ``***``; the
webhook secret never appears anywhere.

Signing (Standard Webhooks)
---------------------------
Webhook POSTs follow https://www.standardwebhooks.com (spec version 1.0.0), so any of its
libraries can verify them. The secret, read from ``$PLAYBOOK_WEBHOOK_SECRET`` by default,
is ``whsec_`` followed by the base64 of at least 24 random bytes, e.g. from
``python -c "import os, base64; print('whsec_' + base64.b64encode(os.urandom(32)).decode())"``.
Every request carries::

    webhook-id: <message id>           the same on every attempt: use it to de-duplicate
    webhook-timestamp: <unix seconds>  the time of this attempt
    webhook-signature: v1,<base64 of HMAC-SHA256(key, "<id>.<timestamp>.<body>")>
    content-type: application/json

where ``key`` is the base64-decoded secret and ``<body>`` the exact bytes of the request
body. A receiver recomputes the signature over the raw body (before parsing the JSON),
compares in constant time, and rejects timestamps more than a few minutes from its clock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import random as _random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any

import httpx

from engine.errors import SettingsError, UsageError
from engine.export.model import WebhookConfig

__all__ = [
    "MAX_RESPONSE_BYTES",
    "SECRET_PREFIX",
    "WECOM_RETRYABLE_ERRCODES",
    "Outcome",
    "Poster",
    "RetryPolicy",
    "backoff_delay",
    "decode_secret",
    "parse_retry_after",
    "redact",
    "sign",
    "webhook_headers",
    "wecom_result",
]

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24  # the spec's minimum for a symmetric signing secret
MAX_RESPONSE_BYTES = 64 * 1024  # what an Outcome keeps of a response body
# WeCom errcodes that mean "not now" rather than "never": -1 system busy, 45009 API
# frequency limit, 45033 too many concurrent calls.
WECOM_RETRYABLE_ERRCODES = frozenset({-1, 45009, 45033})
USER_AGENT = "playbook-engine"

# --------------------------------------------------------------------------- signing


def decode_secret(secret: str) -> bytes:
    """Return the key bytes of a ``whsec_<base64>`` secret, or raise UsageError.

    Padding may be left off the base64; surrounding whitespace is ignored. The message
    never quotes the secret itself.
    """
    text = secret.strip()
    if not text.startswith(SECRET_PREFIX):
        raise UsageError(
            f"the webhook secret must start with {SECRET_PREFIX!r} followed by base64 "
            "(Standard Webhooks format, e.g. whsec_ + base64 of 32 random bytes)"
        )
    encoded = text[len(SECRET_PREFIX) :]
    encoded += "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(
            f"the webhook secret is not valid base64 after {SECRET_PREFIX!r} "
            "(use the standard alphabet A-Z a-z 0-9 + /)"
        ) from None
    if len(key) < MIN_SECRET_BYTES:
        raise UsageError(
            f"the webhook secret is too short: {len(key)} bytes after base64 decoding, "
            f"Standard Webhooks asks for at least {MIN_SECRET_BYTES}"
        )
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the Standard Webhooks signature ``v1,<base64>`` of one attempt.

    The signed content is ``{msg_id}.{timestamp}.`` followed by the exact body bytes.
    `msg_id` may not contain ``.`` (the spec forbids it: it would make the content
    ambiguous).
    """
    if not msg_id or "." in msg_id:
        raise ValueError(f"a webhook id must be non-empty and contain no '.': {msg_id!r}")
    content = f"{msg_id}.{int(timestamp)}.".encode() + body
    digest = hmac.new(key, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def webhook_headers(key: bytes, msg_id: str, body: bytes, now: int) -> dict[str, str]:
    """The Standard Webhooks headers (and the JSON content type) for one attempt at `now`."""
    timestamp = int(now)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, msg_id, timestamp, body),
        "content-type": "application/json",
    }


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class RetryPolicy:
    """How long one attempt may take, and how often and how long to retry."""

    timeout: float = 10.0  # seconds to connect, to send, and between reads of the answer
    max_attempts: int = 5  # attempts in all, the first one included
    backoff: float = 0.5  # the first retry waits up to this long, doubling each time
    max_backoff: float = 60.0  # the most a backoff wait can grow to
    max_retry_after: float = 300.0  # a longer Retry-After gives the batch up (retryable)

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.timeout, int | float) and self.timeout > 0):
            problems.append(f"timeout must be a positive number of seconds, not {self.timeout!r}")
        if isinstance(self.max_attempts, bool) or not (
            isinstance(self.max_attempts, int) and self.max_attempts >= 1
        ):
            problems.append(f"max_attempts must be a whole number >= 1, not {self.max_attempts!r}")
        for name in ("backoff", "max_backoff", "max_retry_after"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value >= 0 and math.isfinite(value)):
                problems.append(f"{name} must be a number of seconds >= 0, not {value!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_config(cls, c: WebhookConfig) -> RetryPolicy:
        """The policy of the settings' ``export.webhook`` section (SettingsError if invalid)."""
        try:
            return cls(
                timeout=c.timeout,
                max_attempts=c.max_attempts,
                backoff=c.backoff,
                max_backoff=c.max_backoff,
            )
        except ValueError as exc:
            raise SettingsError(f"export.webhook: {exc}") from None


def backoff_delay(policy: RetryPolicy, attempt: int, rnd: float) -> float:
    """The wait after failed attempt number `attempt` (1-based), for a random `rnd` in [0, 1).

    Full jitter: ``rnd * min(max_backoff, backoff * 2**(attempt - 1))``.
    """
    exponent = min(max(attempt - 1, 0), 1023)  # 2.0**1024 overflows; the cap is long reached
    cap = min(policy.max_backoff, policy.backoff * 2.0**exponent)
    return min(max(rnd, 0.0), 1.0) * cap


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date), or None.

    A date in the past means 0; an unreadable value means None (use the normal backoff).
    """
    if value is None:
        return None
    text = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone: HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Outcome:
    """What became of one POST, after all its attempts."""

    status: str  # "accepted" | "failed" | "gone"
    http_status: int | None  # the last answer's status code; None if none came
    attempts: int
    error: str | None  # one line: why it failed or is gone; None when accepted
    retryable: bool  # failed, but a later export may succeed (always False otherwise)
    response: bytes = b""  # the last answer's body, at most MAX_RESPONSE_BYTES

    @property
    def ok(self) -> bool:
        """True when accepted."""
        return self.status == "accepted"


_SECRET_QUERY = re.compile(
    r"(?i)(?<![A-Za-z0-9_])"
    r"(access_token|token|key|api_key|apikey|secret|client_secret|signature|sign|password)"
    r"=[^&\s#'\"<>]*"
)
_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@]+):[^/\s@]*@")


def redact(text: str) -> str:
    """`text` with credential query values (``access_token=...`` etc.) and URL passwords
    replaced by ``***``."""
    text = _SECRET_QUERY.sub(lambda m: f"{m.group(1)}=***", text)
    return _USERINFO.sub(r"\1:***@", text)


def _one_line(text: str, limit: int = 400) -> str:
    flat = redact(" ".join(text.split()))
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _snippet(body: bytes, limit: int = 200) -> str:
    return _one_line(body[: limit * 4].decode("utf-8", errors="replace"), limit)


def wecom_result(outcome: Outcome) -> Outcome:
    """Read a WeCom answer: an accepted HTTP 200 whose JSON ``errcode`` is not 0 fails.

    errcode -1, 45009 and 45033 (busy, rate limited) are retryable, other codes are not;
    an answer that is not a JSON object with an integer ``errcode`` fails, not retryable.
    Outcomes that are not accepted are returned unchanged.
    """
    if outcome.status != "accepted":
        return outcome
    try:
        data: Any = json.loads(outcome.response)
    except (ValueError, UnicodeDecodeError):
        return replace(
            outcome,
            status="failed",
            retryable=False,
            error=_one_line(
                f"WeCom answered HTTP {outcome.http_status} with a body that is not JSON: "
                + _snippet(outcome.response, 120)
            ),
        )
    errcode = data.get("errcode") if isinstance(data, dict) else None
    if isinstance(errcode, bool) or not isinstance(errcode, int):
        return replace(
            outcome,
            status="failed",
            retryable=False,
            error=_one_line(
                f"WeCom answered HTTP {outcome.http_status} without an integer errcode: "
                + _snippet(outcome.response, 120)
            ),
        )
    if errcode == 0:
        return outcome
    errmsg = data.get("errmsg", "")
    return replace(
        outcome,
        status="failed",
        retryable=errcode in WECOM_RETRYABLE_ERRCODES,
        error=_one_line(f"WeCom errcode {errcode}: {errmsg}"),
    )


# --------------------------------------------------------------------------- the poster


@dataclass(frozen=True)
class _Try:
    """One attempt: the outcome if we stop here, whether to retry, and a server-set wait."""

    outcome: Outcome
    retry: bool
    wait: float | None = None


Headers = Callable[[], Mapping[str, str]] | Mapping[str, str]


class Poster:
    """POSTs bodies with retries; one `httpx.Client` (one connection pool) per Poster.

    `sleep`, `random` and `clock` are injectable so tests need not wait. A `client` passed
    in is used as is (the policy's timeout still applies per request) and is not closed by
    `close()`; otherwise the Poster makes one and closes it.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        random: Callable[[], float] = _random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self._timeout = httpx.Timeout(policy.timeout)
        self._owns_client = client is None
        self._client = client or httpx.Client(
            timeout=self._timeout,
            follow_redirects=False,
            headers={"user-agent": USER_AGENT},
        )
        self._sleep = sleep
        self._random = random
        self._clock = clock

    def __enter__(self) -> Poster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool (unless the client was passed in)."""
        if self._owns_client:
            self._client.close()

    def send(
        self,
        url: str,
        body: bytes,
        headers: Headers,
        *,
        idempotency_id: str | None = None,
        check: Callable[[Outcome], Outcome] | None = None,
    ) -> Outcome:
        """POST `body` to `url` until it is accepted, gone, or failed for good.

        `headers` is a mapping, or a callable called before every attempt (so a webhook
        timestamp and signature are fresh each time). `idempotency_id`, if given, is sent
        as ``Idempotency-Key`` on every attempt (unless the headers already have one).
        `check`, if given, judges each 2xx outcome (e.g. `wecom_result`); a checked outcome
        that is failed and retryable is retried like a 5xx. Never raises for HTTP or
        network problems.
        """
        policy = self.policy
        attempt = 0
        while True:
            attempt += 1
            sent = dict(headers() if callable(headers) else headers)
            if idempotency_id is not None and not any(k.lower() == "idempotency-key" for k in sent):
                sent["Idempotency-Key"] = idempotency_id
            result = self._attempt(url, body, sent, attempt, check)
            if not result.retry:
                return result.outcome
            if result.wait is not None and result.wait > policy.max_retry_after:
                return replace(
                    result.outcome,
                    error=_one_line(
                        f"{result.outcome.error}; Retry-After asks to wait "
                        f"{result.wait:g} s, more than the {policy.max_retry_after:g} s limit"
                    ),
                )
            if attempt >= policy.max_attempts:
                return replace(
                    result.outcome,
                    error=_one_line(
                        f"{result.outcome.error} (gave up after {attempt} "
                        f"attempt{'s' if attempt != 1 else ''})"
                    ),
                )
            wait = result.wait
            if wait is None:
                wait = backoff_delay(policy, attempt, self._random())
            self._sleep(wait)

    # One attempt -----------------------------------------------------------------

    def _attempt(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        attempt: int,
        check: Callable[[Outcome], Outcome] | None,
    ) -> _Try:
        def failed(
            error: str, retryable: bool, status: int | None = None, data: bytes = b""
        ) -> _Try:
            outcome = Outcome("failed", status, attempt, _one_line(error), retryable, data)
            return _Try(outcome, retry=retryable)

        try:
            with self._client.stream(
                "POST", url, content=body, headers=headers, timeout=self._timeout
            ) as response:
                status = response.status_code
                data = self._read(response)
                retry_after = response.headers.get("retry-after")
                location = response.headers.get("location")
                reason = response.reason_phrase
        except httpx.TimeoutException as exc:
            return failed(f"{type(exc).__name__}: no answer within {self.policy.timeout:g} s", True)
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
            return failed(f"{type(exc).__name__}: {exc}", False)
        except httpx.HTTPError as exc:
            return failed(f"{type(exc).__name__}: {exc}", True)
        except OSError as exc:  # a socket error httpx did not wrap
            return failed(f"{type(exc).__name__}: {exc}", True)

        head = f"HTTP {status} {reason}".rstrip()
        detail = f"{head}: {_snippet(data)}" if data.strip() else head
        if 200 <= status < 300:
            outcome = Outcome("accepted", status, attempt, None, False, data)
            if check is not None:
                outcome = replace(check(outcome), attempts=attempt)
            return _Try(outcome, retry=outcome.status == "failed" and outcome.retryable)
        if status == 410:
            outcome = Outcome(
                "gone",
                status,
                attempt,
                _one_line(f"{detail} (the endpoint asks to be sent nothing more)"),
                False,
                data,
            )
            return _Try(outcome, retry=False)
        if status == 429 or status == 408 or 500 <= status < 600:
            wait = parse_retry_after(retry_after, self._clock())
            result = failed(detail, True, status, data)
            return replace(result, wait=wait)
        if 300 <= status < 400:
            where = f" to {location}" if location else ""
            return failed(
                f"{head}{where} (redirects are not followed: configure the final URL)",
                False,
                status,
                data,
            )
        return failed(detail, False, status, data)

    @staticmethod
    def _read(response: httpx.Response) -> bytes:
        """Up to MAX_RESPONSE_BYTES of the body; what came if reading breaks off."""
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size >= MAX_RESPONSE_BYTES:
                    break
        except (httpx.HTTPError, OSError):
            pass  # the status line and headers arrived: judge by them
        return b"".join(chunks)[:MAX_RESPONSE_BYTES]
