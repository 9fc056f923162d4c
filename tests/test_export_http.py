"""HTTP delivery (engine.export.http): signing checked by the independent `standardwebhooks`
implementation, retries and status handling against a real server on 127.0.0.1.

No test really sleeps between attempts: `sleep` is injected and records what was asked.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from email.utils import formatdate
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks import Webhook, WebhookVerificationError

from engine.errors import SettingsError, UsageError
from engine.export.http import (
    MAX_RESPONSE_BYTES,
    Outcome,
    Poster,
    RetryPolicy,
    backoff_delay,
    decode_secret,
    parse_retry_after,
    redact,
    sign,
    webhook_headers,
    wecom_result,
)
from engine.export.model import WebhookConfig
from tests.loopback import Answer, LoopbackServer

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
KEY = bytes(range(32))
BODY = json.dumps({"type": "playbook.actions", "data": [{"action_id": "a1"}]}).encode()
TOKEN = "SeCrEtToKeN123"


class Sleeps:
    """An injected `sleep` that records the waits instead of waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def poster(sleeps: Sleeps, **policy: Any) -> Poster:
    options: dict[str, Any] = {"timeout": 5.0, **policy}
    return Poster(RetryPolicy(**options), sleep=sleeps, random=lambda: 0.5)


def signed(msg_id: str = "msg_batch1", body: bytes = BODY) -> Any:
    """Headers for every attempt, stamped with the real time (the verifier checks it)."""
    return lambda: webhook_headers(KEY, msg_id, body, int(time.time()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --------------------------------------------------------------------------- secrets


def test_decode_secret_accepts_padded_unpadded_and_surrounding_whitespace() -> None:
    assert decode_secret(SECRET) == KEY
    unpadded = "whsec_" + base64.b64encode(bytes(25)).decode().rstrip("=")
    assert decode_secret(unpadded) == bytes(25)
    assert decode_secret(f"  {SECRET}\n") == KEY


@pytest.mark.parametrize(
    ("secret", "words"),
    [
        ("", "must start with 'whsec_'"),
        (base64.b64encode(bytes(32)).decode(), "must start with 'whsec_'"),
        ("whsk_" + base64.b64encode(bytes(32)).decode(), "must start with 'whsec_'"),
        ("whsec_", "too short"),
        ("whsec_not*base64!at-all_", "not valid base64"),
        ("whsec_" + base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(), "not valid base64"),
        ("whsec_abcde", "not valid base64"),  # 5 characters cannot be base64
        ("whsec_" + base64.b64encode(b"short").decode(), "too short"),
    ],
)
def test_bad_secrets_are_usage_errors_that_do_not_quote_the_secret(secret: str, words: str) -> None:
    with pytest.raises(UsageError, match=words) as caught:
        decode_secret(secret)
    tail = secret.removeprefix("whsec_")
    assert len(tail) < 6 or tail not in str(caught.value)


# --------------------------------------------------------------------------- signing


def test_sign_matches_the_reference_vector_and_the_reference_library() -> None:
    # The test vector the Standard Webhooks / Svix libraries use.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    msg_id, ts, payload = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert sign(decode_secret(secret), msg_id, ts, payload) == expected
    headers = webhook_headers(decode_secret(secret), msg_id, payload, ts)
    assert headers == {
        "webhook-id": msg_id,
        "webhook-timestamp": "1614265330",
        "webhook-signature": expected,
        "content-type": "application/json",
    }


def test_sign_refuses_ids_that_would_make_the_signed_content_ambiguous() -> None:
    with pytest.raises(ValueError):
        sign(KEY, "msg.1", 1, b"{}")
    with pytest.raises(ValueError):
        sign(KEY, "", 1, b"{}")


def test_what_the_server_received_verifies_with_standardwebhooks(
    loopback: LoopbackServer,
) -> None:
    body = json.dumps({"message": "您好，欢迎回来", "n": 1}, ensure_ascii=False).encode()
    with poster(Sleeps()) as p:
        outcome = p.send(loopback.url + "/hook", body, signed("msg_1", body))
    assert outcome == Outcome("accepted", 200, 1, None, False, b'{"errcode":0,"errmsg":"ok"}')
    [request] = loopback.requests
    assert request.method == "POST"
    assert request.path == "/hook"
    assert request.body == body
    assert request.headers["content-type"] == "application/json"
    assert Webhook(SECRET).verify(request.body, request.headers) == json.loads(body)

    # One byte changed (an ASCII digit: the body stays valid UTF-8) breaks the signature.
    index = body.index(b"1")
    altered = body[:index] + b"2" + body[index + 1 :]
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(altered, request.headers)
    # So does another secret.
    other = "whsec_" + base64.b64encode(bytes(range(1, 33))).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(request.body, request.headers)


# --------------------------------------------------------------------------- retries


def test_5xx_is_retried_with_the_same_webhook_id_and_a_fresh_signature(
    loopback: LoopbackServer,
) -> None:
    loopback.script(500, 500, 200)
    sleeps = Sleeps()
    with poster(sleeps) as p:
        outcome = p.send(loopback.url, BODY, signed("msg_retry"))
    assert (outcome.status, outcome.attempts, outcome.http_status) == ("accepted", 3, 200)
    requests = loopback.requests
    assert len(requests) == 3
    assert {r.headers["webhook-id"] for r in requests} == {"msg_retry"}
    for request in requests:
        Webhook(SECRET).verify(request.body, request.headers)
    # Full jitter with random() = 0.5: half of 0.5 s, then half of 1 s.
    assert sleeps.calls == [0.25, 0.5]


def test_headers_callable_is_called_before_every_attempt(loopback: LoopbackServer) -> None:
    loopback.script(503, 502, 200)
    stamps = iter([1000, 1001, 1002])
    with poster(Sleeps()) as p:
        outcome = p.send(
            loopback.url, BODY, lambda: webhook_headers(KEY, "msg_x", BODY, next(stamps))
        )
    assert outcome.attempts == 3
    got = [
        (r.headers["webhook-timestamp"], r.headers["webhook-signature"]) for r in loopback.requests
    ]
    assert got == [(str(t), sign(KEY, "msg_x", t, BODY)) for t in (1000, 1001, 1002)]


def test_429_waits_as_long_as_retry_after_says(loopback: LoopbackServer) -> None:
    loopback.script((429, {"Retry-After": "1"}), 200)
    sleeps = Sleeps()
    with poster(sleeps) as p:
        outcome = p.send(loopback.url, BODY, signed())
    assert (outcome.status, outcome.attempts) == ("accepted", 2)
    assert sleeps.calls == [1.0]
    assert len(loopback.requests) == 2


def test_retry_after_as_an_http_date(loopback: LoopbackServer) -> None:
    now = 1_717_200_000.0
    loopback.script((503, {"Retry-After": formatdate(now + 30, usegmt=True)}), 200)
    sleeps = Sleeps()
    with Poster(RetryPolicy(), sleep=sleeps, clock=lambda: now) as p:
        outcome = p.send(loopback.url, BODY, signed())
    assert (outcome.status, outcome.attempts) == ("accepted", 2)
    assert sleeps.calls == [30.0]


def test_a_missing_or_unreadable_retry_after_uses_the_backoff(loopback: LoopbackServer) -> None:
    loopback.script(429, (503, {"Retry-After": "soon"}), 200)
    sleeps = Sleeps()
    with poster(sleeps, backoff=2.0) as p:
        assert p.send(loopback.url, BODY, signed()).attempts == 3
    assert sleeps.calls == [1.0, 2.0]


def test_a_retry_after_beyond_the_limit_gives_up_as_retryable(loopback: LoopbackServer) -> None:
    loopback.script((429, {"Retry-After": "3600"}))
    sleeps = Sleeps()
    with poster(sleeps) as p:
        outcome = p.send(loopback.url, BODY, signed())
    assert (outcome.status, outcome.retryable, outcome.attempts) == ("failed", True, 1)
    assert outcome.http_status == 429
    assert outcome.error is not None
    assert "429" in outcome.error and "3600" in outcome.error and "300" in outcome.error
    assert sleeps.calls == []
    assert len(loopback.requests) == 1


def test_410_is_gone_after_one_request(loopback: LoopbackServer) -> None:
    loopback.script(410)
    sleeps = Sleeps()
    with poster(sleeps) as p:
        outcome = p.send(loopback.url, BODY, signed())
    assert (outcome.status, outcome.http_status, outcome.attempts) == ("gone", 410, 1)
    assert not outcome.retryable
    assert outcome.error is not None and "410" in outcome.error
    assert len(loopback.requests) == 1
    assert sleeps.calls == []


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_4xx_fail_at_once_not_retryable(loopback: LoopbackServer, status: int) -> None:
    loopback.script((status, {}, {"error": "bad field 'x'"}))
    with poster(Sleeps()) as p:
        outcome = p.send(loopback.url, BODY, signed())
    assert (outcome.status, outcome.http_status, outcome.attempts) == ("failed", status, 1)
    assert not outcome.retryable
    assert outcome.error is not None
    assert outcome.error.startswith(f"HTTP {status} ")
    assert "bad field 'x'" in outcome.error
    assert "\n" not in outcome.error
    assert outcome.response == b'{"error": "bad field \'x\'"}'
    assert len(loopback.requests) == 1


def test_redirects_are_not_followed(loopback: LoopbackServer) -> None:
    loopback.script((301, {"Location": "/elsewhere"}))
    with poster(Sleeps()) as p:
        outcome = p.send(loopback.url, BODY, signed())
    assert (outcome.status, outcome.retryable, outcome.http_status) == ("failed", False, 301)
    assert outcome.error is not None and "/elsewhere" in outcome.error
    assert len(loopback.requests) == 1


def test_a_hanging_server_times_out_and_the_retry_succeeds() -> None:
    with LoopbackServer() as server:
        server.script(("hang", 3.0), 200)
        sleeps = Sleeps()
        started = time.monotonic()
        with poster(sleeps, timeout=0.3) as p:
            outcome = p.send(server.url, BODY, signed())
        assert time.monotonic() - started < 2.5
        assert (outcome.status, outcome.attempts) == ("accepted", 2)
        assert len(server.requests) == 2
        assert sleeps.calls == [0.25]
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 2.0  # stop() cut the hang short


def test_timeouts_until_max_attempts_name_the_exception() -> None:
    with LoopbackServer(hang_seconds=3.0) as server:
        server.default("hang")
        with poster(Sleeps(), timeout=0.2, max_attempts=2) as p:
            outcome = p.send(server.url, BODY, signed())
    assert (outcome.status, outcome.retryable, outcome.attempts) == ("failed", True, 2)
    assert outcome.http_status is None
    assert outcome.error == "ReadTimeout: no answer within 0.2 s (gave up after 2 attempts)"


def test_max_attempts_exhausted_is_failed_and_retryable(loopback: LoopbackServer) -> None:
    loopback.default(500)
    sleeps = Sleeps()
    with poster(sleeps, max_attempts=4) as p:
        outcome = p.send(loopback.url, BODY, signed())
    assert (outcome.status, outcome.retryable, outcome.attempts) == ("failed", True, 4)
    assert outcome.http_status == 500
    assert outcome.error is not None
    assert outcome.error.startswith("HTTP 500 ")
    assert outcome.error.endswith("(gave up after 4 attempts)")
    assert len(loopback.requests) == 4
    assert sleeps.calls == [0.25, 0.5, 1.0]  # no wait after the last attempt


def test_connection_errors_are_retried() -> None:
    url = f"http://127.0.0.1:{free_port()}/hook?access_token={TOKEN}"
    with poster(Sleeps(), max_attempts=2) as p:
        outcome = p.send(url, BODY, signed())
    assert (outcome.status, outcome.retryable, outcome.attempts) == ("failed", True, 2)
    assert outcome.http_status is None
    assert outcome.error is not None and outcome.error.startswith("ConnectError")
    assert TOKEN not in outcome.error


def test_a_dropped_connection_is_retried(loopback: LoopbackServer) -> None:
    loopback.script("close", 200)
    with poster(Sleeps()) as p:
        outcome = p.send(loopback.url, BODY, signed())
    assert (outcome.status, outcome.attempts) == ("accepted", 2)


def test_a_url_without_a_scheme_fails_without_retrying() -> None:
    with poster(Sleeps()) as p:
        outcome = p.send(f"example.invalid/send?access_token={TOKEN}", BODY, {})
    assert (outcome.status, outcome.retryable, outcome.attempts) == ("failed", False, 1)
    assert outcome.error is not None and "UnsupportedProtocol" in outcome.error


# --------------------------------------------------------------------------- backoff


@settings(max_examples=200, deadline=None)
@given(
    attempt=st.integers(min_value=1, max_value=2000),
    rnd=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    backoff=st.floats(min_value=0.0, max_value=100.0),
    max_backoff=st.floats(min_value=0.0, max_value=3600.0),
)
def test_backoff_stays_within_full_jitter_bounds(
    attempt: int, rnd: float, backoff: float, max_backoff: float
) -> None:
    policy = RetryPolicy(backoff=backoff, max_backoff=max_backoff)
    cap = min(max_backoff, backoff * 2.0 ** min(attempt - 1, 1023))
    delay = backoff_delay(policy, attempt, rnd)
    assert 0.0 <= delay <= cap
    assert delay == pytest.approx(rnd * cap)


@settings(max_examples=50, deadline=None)
@given(randoms=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=9))
def test_poster_waits_follow_the_jittered_schedule(randoms: list[float]) -> None:
    """Property test of the whole loop, on httpx's in-memory transport (always 503)."""
    policy = RetryPolicy(max_attempts=len(randoms) + 1, backoff=0.5, max_backoff=8.0)
    sleeps = Sleeps()
    values = iter(randoms)
    client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(503)))
    with client, Poster(policy, client=client, sleep=sleeps, random=lambda: next(values)) as p:
        outcome = p.send("http://example.invalid/", BODY, {})
    assert (outcome.status, outcome.attempts) == ("failed", len(randoms) + 1)
    assert len(sleeps.calls) == len(randoms)
    for k, (slept, rnd) in enumerate(zip(sleeps.calls, randoms, strict=True), start=1):
        bound = min(8.0, 0.5 * 2 ** (k - 1))
        assert 0.0 <= slept <= bound
        assert slept == pytest.approx(rnd * bound)


def test_parse_retry_after() -> None:
    now = 1_717_200_000.0
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after(formatdate(now + 90, usegmt=True), now) == 90.0
    assert parse_retry_after(formatdate(now - 90, usegmt=True), now) == 0.0
    assert parse_retry_after("Sat, 01 Jun 2024 00:01:30 GMT", 1_717_200_000.0) == 90.0
    for junk in ("", "-5", "soon", "1e9", "Mon, 99 Foo 2024"):
        assert parse_retry_after(junk, now) is None


def test_retry_policy_from_config() -> None:
    config = WebhookConfig(timeout=3.0, max_attempts=2, backoff=1.0, max_backoff=9.0)
    assert RetryPolicy.from_config(config) == RetryPolicy(3.0, 2, 1.0, 9.0, 300.0)
    assert RetryPolicy.from_config(WebhookConfig()) == RetryPolicy()
    with pytest.raises(SettingsError, match="max_attempts"):
        RetryPolicy.from_config(WebhookConfig(max_attempts=0))
    with pytest.raises(SettingsError, match="timeout"):
        RetryPolicy.from_config(WebhookConfig(timeout=0))


# --------------------------------------------------------------------------- WeCom


def accepted(body: Any) -> Outcome:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Outcome("accepted", 200, 1, None, False, raw)


def test_wecom_result_reads_errcode() -> None:
    ok = accepted({"errcode": 0, "errmsg": "ok", "msgid": "m1"})
    assert wecom_result(ok) is ok
    busy = wecom_result(accepted({"errcode": 45009, "errmsg": "api freq out of limit"}))
    assert (busy.status, busy.retryable, busy.http_status) == ("failed", True, 200)
    assert busy.error == "WeCom errcode 45009: api freq out of limit"
    for code in (-1, 45033):
        assert wecom_result(accepted({"errcode": code, "errmsg": "busy"})).retryable
    bad = wecom_result(accepted({"errcode": 40003, "errmsg": "invalid external userid"}))
    assert (bad.status, bad.retryable) == ("failed", False)
    assert bad.error == "WeCom errcode 40003: invalid external userid"
    for junk in (b"<html>gateway</html>", b"[1]", b'{"errmsg": "ok"}', b'{"errcode": "0"}'):
        result = wecom_result(accepted(junk))
        assert (result.status, result.retryable) == ("failed", False), junk
    failed = Outcome("failed", 500, 5, "HTTP 500", True, b"")
    assert wecom_result(failed) is failed


def test_a_busy_wecom_answer_is_retried(loopback: LoopbackServer) -> None:
    loopback.script({"errcode": 45009, "errmsg": "api freq out of limit"})
    sleeps = Sleeps()
    with poster(sleeps) as p:
        outcome = p.send(loopback.url, b"{}", {}, check=wecom_result)
    assert (outcome.status, outcome.attempts, outcome.error) == ("accepted", 2, None)
    assert sleeps.calls == [0.25]


def test_a_refusing_wecom_answer_is_not_retried(loopback: LoopbackServer) -> None:
    loopback.script({"errcode": 41001, "errmsg": "access_token missing"})
    with poster(Sleeps()) as p:
        outcome = p.send(loopback.url, b"{}", {}, check=wecom_result)
    assert (outcome.status, outcome.retryable, outcome.attempts) == ("failed", False, 1)
    assert outcome.error == "WeCom errcode 41001: access_token missing"
    assert len(loopback.requests) == 1


def test_wecom_busy_until_max_attempts(loopback: LoopbackServer) -> None:
    loopback.default({"errcode": -1, "errmsg": "system busy"})
    with poster(Sleeps(), max_attempts=3) as p:
        outcome = p.send(loopback.url, b"{}", {}, check=wecom_result)
    assert (outcome.status, outcome.retryable, outcome.attempts) == ("failed", True, 3)
    assert outcome.error == "WeCom errcode -1: system busy (gave up after 3 attempts)"


# --------------------------------------------------------------------------- redaction


def test_redact() -> None:
    text = (
        "POST https://qyapi.weixin.qq.com/cgi-bin/x?access_token=abc-DEF_1&debug=1 "
        "https://h/send?key=k1 'access_token=q' https://user:pw@host/p api_key=z tokens=keep"
    )
    assert redact(text) == (
        "POST https://qyapi.weixin.qq.com/cgi-bin/x?access_token=***&debug=1 "
        "https://h/send?key=*** 'access_token=***' https://user:***@host/p api_key=*** "
        "tokens=keep"
    )


def test_the_access_token_never_appears_in_an_error(loopback: LoopbackServer) -> None:
    url = f"{loopback.url}/cgi-bin/externalcontact/add_msg_template?access_token={TOKEN}"
    echo = f"invalid request to /cgi-bin/x?access_token={TOKEN}&debug=1"
    loopback.script(
        (400, {}, echo),
        (302, {"Location": f"https://elsewhere/?access_token={TOKEN}"}),
        {"errcode": 40014, "errmsg": f"invalid access_token, hint: access_token={TOKEN}"},
    )
    with poster(Sleeps()) as p:
        outcomes = [p.send(url, b"{}", {}, check=wecom_result) for _ in range(3)]
    assert [o.http_status for o in outcomes] == [400, 302, 200]
    for outcome in outcomes:
        assert outcome.status == "failed"
        assert outcome.error is not None
        assert TOKEN not in outcome.error
        assert "access_token=***" in outcome.error
    # The request itself carried the token (the server saw it).
    assert loopback.requests[0].path.endswith(f"access_token={TOKEN}")


# --------------------------------------------------------------------------- details


def test_idempotency_key_is_sent_on_every_attempt(loopback: LoopbackServer) -> None:
    loopback.script(500, 200)
    with poster(Sleeps()) as p:
        p.send(loopback.url, b"{}", {"X-Extra": "1"}, idempotency_id="batch-7")
    assert [r.headers["idempotency-key"] for r in loopback.requests] == ["batch-7", "batch-7"]
    assert [r.headers["x-extra"] for r in loopback.requests] == ["1", "1"]


def test_the_kept_response_body_is_truncated(loopback: LoopbackServer) -> None:
    loopback.script((200, {"Content-Type": "text/plain"}, b"x" * (MAX_RESPONSE_BYTES * 2)))
    with poster(Sleeps()) as p:
        outcome = p.send(loopback.url, b"{}", {})
    assert outcome.status == "accepted"
    assert outcome.response == b"x" * MAX_RESPONSE_BYTES


def test_an_injected_client_is_used_and_left_open() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    client = httpx.Client(transport=httpx.MockTransport(handler))
    with client:
        with Poster(RetryPolicy(), client=client) as p:
            outcome = p.send("http://example.invalid/x", b"abc", {"a": "b"})
        assert not client.is_closed
    assert (outcome.status, outcome.http_status, outcome.response) == ("accepted", 204, b"")
    assert seen[0].content == b"abc"
    assert seen[0].headers["a"] == "b"


# --------------------------------------------------------------------------- the server


def test_loopback_answers_other_requests_while_one_hangs(loopback: LoopbackServer) -> None:
    loopback.script(("hang", 30.0))
    errors: list[str] = []

    def slow() -> None:
        try:
            httpx.post(loopback.url + "/slow", content=b"1", timeout=10)
        except httpx.HTTPError as exc:  # stop() drops the hanging connection
            errors.append(type(exc).__name__)

    hanging = threading.Thread(target=slow, daemon=True)
    hanging.start()
    loopback.wait_for(1)
    started = time.monotonic()
    response = httpx.post(loopback.url + "/fast?a=1", content=b"2", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"errcode": 0, "errmsg": "ok"}
    assert time.monotonic() - started < 2.0
    stopping = time.monotonic()
    loopback.stop()
    assert time.monotonic() - stopping < 2.0
    hanging.join(timeout=5)
    assert not hanging.is_alive()
    assert errors == ["RemoteProtocolError"]
    assert [r.path for r in loopback.requests] == ["/slow", "/fast?a=1"]


def test_loopback_answer_forms() -> None:
    with LoopbackServer() as server:
        server.script(
            Answer(status=202, headers={"X-A": "1"}, body=b"ok"),
            (503, {"Retry-After": "7"}),
            (200, {}, {"errcode": 0}),
        )
        server.default(418)
        with httpx.Client() as client:
            first = client.put(server.url + "/p", content=b"abc")
            second = client.post(server.url, content=b"")
            third = client.post(server.url)
            fourth = client.get(server.url)
        assert (first.status_code, first.headers["x-a"], first.content) == (202, "1", b"ok")
        assert (second.status_code, second.headers["retry-after"]) == (503, "7")
        assert third.json() == {"errcode": 0}
        assert fourth.status_code == 418
        assert server.pending == 0
        assert [r.method for r in server.requests] == ["PUT", "POST", "POST", "GET"]
        assert server.requests[0].body == b"abc"
        with pytest.raises(TypeError):
            server.script("teapot")


def test_loopback_receives_posts_from_a_subprocess(loopback: LoopbackServer) -> None:
    code = (
        "import sys, httpx; "
        "r = httpx.post(sys.argv[1] + '/from-child', json={'pid': 1}, timeout=10); "
        "print(r.status_code, r.text)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, loopback.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == '200 {"errcode":0,"errmsg":"ok"}'
    [request] = loopback.requests
    assert (request.path, request.json()) == ("/from-child", {"pid": 1})
    assert request.headers["content-type"] == "application/json"
