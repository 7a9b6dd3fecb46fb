"""Bounded waits for everything we fetch: one timeout, minimum rate and retry policy, and the advice when the
network fails.

An endpoint (or a proxy) that accepts a connection and never answers must not hang a user's script, and neither
must one that answers one byte per second: every request we start has a connect and a read timeout, every body
must keep arriving at a minimum rate, and a download is tried a bounded number of times, so that a stalled or
trickling endpoint ends in about a minute in an error that names it (and the rate it sent at) and says what to do.

- Our own downloads (`harmonization.hub.download_file`: the published originals, ClickMe shards) use
  `timeout()`, `RateGuard` and `attempts()`.
- huggingface_hub's HTTP client has no timeout by default (its repo listing waits forever on a stalled Hub), nor
  a minimum rate: `bound_huggingface_hub()` gives the client it shares a default timeout for every request that
  sets none, and a `RateGuard` on every answer's body. A client factory the user installed with
  `huggingface_hub.set_client_factory` is left alone.

Environment (read at each use; a value out of range is an error naming the variable):

- `HARMONIZATION_NETWORK_TIMEOUT`: seconds to wait for a connection or for the next bytes of an answer
  (default 20, at most 3600).
- `HARMONIZATION_NETWORK_MIN_RATE`: bytes per second a body must average over every `timeout()` seconds
  (default 1024, i.e. 1 KiB/s); a slower one is cut off with `TooSlowError`, which names the URL and the rate.
  A download of one attempt therefore ends within about twice the timeout unless bytes keep arriving at this rate.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Callable, TypeVar

__all__ = ["DEFAULT_ATTEMPTS", "DEFAULT_MIN_RATE", "DEFAULT_TIMEOUT", "MIN_RATE_ENV", "RateGuard", "TIMEOUT_ENV",
           "TooSlowError", "attempts", "bound_huggingface_hub", "format_rate", "min_rate", "offline_advice", "retry",
           "timeout"]

TIMEOUT_ENV = "HARMONIZATION_NETWORK_TIMEOUT"
MIN_RATE_ENV = "HARMONIZATION_NETWORK_MIN_RATE"
#: Seconds to wait for a connection, or for the next bytes of an answer.
DEFAULT_TIMEOUT = 20.0
#: The longest timeout accepted: sockets refuse values past time_t (OverflowError), and no answer is worth an hour.
MAX_TIMEOUT = 3600.0
#: Bytes per second a body must average over each window of `timeout()` seconds (1 KiB/s).
DEFAULT_MIN_RATE = 1024.0
#: The highest minimum rate accepted (1 GB/s): above it every download would be cut off.
MAX_MIN_RATE = 1e9
#: Tries of one download before giving up: a stalled endpoint costs at most about attempts x timeout.
DEFAULT_ATTEMPTS = 2
_RETRY_WAIT = 2.0  # seconds before the next attempt

T = TypeVar("T")


def _bounded_number(variable: str, default: float, maximum: float, unit: str) -> float:
    """The number in environment `variable` (default `default`), in (0, maximum], or an error naming all three."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= maximum):
        raise ValueError(f"{variable} must be a positive number of {unit}, at most {maximum:g}; got {text!r}.")
    return value


def timeout() -> float:
    """The connect/read timeout in seconds: `HARMONIZATION_NETWORK_TIMEOUT`, else 20."""
    return _bounded_number(TIMEOUT_ENV, DEFAULT_TIMEOUT, MAX_TIMEOUT, "seconds")


def min_rate() -> float:
    """The slowest a body may arrive, in bytes per second: `HARMONIZATION_NETWORK_MIN_RATE`, else 1024."""
    return _bounded_number(MIN_RATE_ENV, DEFAULT_MIN_RATE, MAX_MIN_RATE, "bytes per second")


def format_rate(bytes_per_second: float) -> str:
    """`1536.0` -> "1.5 KiB/s": rates in messages, in the units a progress bar shows."""
    value = float(bytes_per_second)
    for unit in ("B/s", "KiB/s", "MiB/s"):
        if value < 1024 or unit == "MiB/s":
            return f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


class TooSlowError(TimeoutError):
    """A body that arrived slower than `min_rate()`; the message is one sentence naming the URL and the rate.

    A `TimeoutError` (so an `OSError`): the callers that retry a stalled download retry a trickling one too.
    """

    def __init__(self, url: str, received: int, seconds: float, minimum: float) -> None:
        self.url, self.received, self.seconds, self.minimum = url, received, seconds, minimum
        self.rate = received / seconds if seconds > 0 else 0.0
        super().__init__(
            f"{url} sent {received} bytes in {seconds:.1f} s ({format_rate(self.rate)}), slower than the minimum of "
            f"{format_rate(minimum)} ({MIN_RATE_ENV})"
        )


class RateGuard:
    """Counts the bytes of one answer as they arrive, and cuts off one that trickles.

    The read timeout alone does not end a download whose server sends one byte per second: each read returns in
    time. So every `window` seconds (default `timeout()`) the bytes of the window are compared with
    `minimum * window` (default `min_rate()`); `add` raises `TooSlowError` when fewer arrived. A small answer that
    ends within one window is never judged.
    """

    def __init__(self, url: str, *, minimum: float | None = None, window: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.minimum = min_rate() if minimum is None else minimum
        self.window = timeout() if window is None else window
        self.received = 0
        self._clock = clock
        self._window_start = clock()
        self._window_received = 0

    def add(self, count: int) -> None:
        """Record `count` more bytes; raise `TooSlowError` if the window that just ended was too slow."""
        self.received += count
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed < self.window:
            return
        arrived = self.received - self._window_received
        if arrived < self.minimum * elapsed:
            raise TooSlowError(self.url, arrived, elapsed, self.minimum)
        self._window_start, self._window_received = now, self.received


def attempts() -> int:
    """How many times one download is tried before its error is raised."""
    return DEFAULT_ATTEMPTS


def retry(call: Callable[[], T], *, transient: Callable[[BaseException], bool]) -> T:
    """Run `call`, again after a short wait when it fails with a `transient` error, at most `attempts()` times."""
    tries = attempts()
    for attempt in range(1, tries + 1):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - re-raised unless transient and tries are left
            if attempt == tries or not transient(error):
                raise
            time.sleep(_RETRY_WAIT)
    raise AssertionError("unreachable")  # pragma: no cover


def offline_advice() -> str:
    """What a user can do when an endpoint cannot be reached: the variables that change where we fetch from."""
    return (
        "Check the network or proxy, then try again. To use only what is cached, set HF_HUB_OFFLINE=1; to use "
        "another Hub endpoint, set HF_ENDPOINT; to fetch the published files from a mirror, set "
        "HARMONIZATION_MODELS_URL (models) or HARMONIZATION_CLICKME_URL (ClickMe); to wait longer, set "
        f"{TIMEOUT_ENV} (seconds, now {timeout():g})."
    )


# --- huggingface_hub's shared client -----------------------------------------------------------------------

_BOUND_LOCK = threading.Lock()


def _bounded_client_factory():
    """huggingface_hub's default client, with a timeout for every request that does not set its own, and a
    minimum rate for every answer's body."""
    import httpx2
    from huggingface_hub.utils import _http

    class RateGuardedStream(httpx2.SyncByteStream):
        """The body of one answer, cut off with `httpx2.ReadError` when it trickles (`RateGuard`).

        A `ReadError`, not a timeout: huggingface_hub resumes a file download after a timeout, and resets its
        count of retries whenever bytes arrived, so a trickle reported as a timeout would be resumed forever.
        """

        def __init__(self, inner, request) -> None:
            self._inner, self._request = inner, request

        def __iter__(self):
            guard = RateGuard(str(self._request.url))
            for chunk in self._inner:
                try:
                    guard.add(len(chunk))
                except TooSlowError as error:
                    raise httpx2.ReadError(str(error), request=self._request) from error
                yield chunk

        def close(self) -> None:
            self._inner.close()

    class BoundedTransport(httpx2.BaseTransport):
        """Fill the timeouts a request leaves unset (None = wait forever) with ours; guard the body's rate."""

        def __init__(self) -> None:
            self._inner = httpx2.HTTPTransport()

        def handle_request(self, request):
            limits = dict(request.extensions.get("timeout") or {})
            for key in ("connect", "read", "write", "pool"):
                if limits.get(key) is None:
                    limits[key] = timeout()
            request.extensions = {**request.extensions, "timeout": limits}
            response = self._inner.handle_request(request)
            response.stream = RateGuardedStream(response.stream, request)
            return response

        def close(self) -> None:
            self._inner.close()

    # As huggingface_hub 2.4's `default_client_factory`, plus the transport.
    return httpx2.Client(
        event_hooks={"request": [_http.hf_request_event_hook]},
        follow_redirects=True,
        timeout=None,
        transport=BoundedTransport(),
    )


def bound_huggingface_hub() -> bool:
    """Give huggingface_hub's shared client a default timeout, unless the user installed their own client factory.

    Returns whether our bounded factory is in place. Idempotent and thread-safe.
    """
    with _BOUND_LOCK:
        from huggingface_hub.utils import _http

        current = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
        if current is _bounded_client_factory:
            return True
        if current is not getattr(_http, "default_client_factory", None):
            return False  # the user's own factory (proxies, certificates, their own timeouts): theirs to bound
        import huggingface_hub

        huggingface_hub.set_client_factory(_bounded_client_factory)
        return True
