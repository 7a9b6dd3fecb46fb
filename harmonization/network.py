"""Bounded waits for everything we fetch: one timeout and retry policy, and the advice when the network fails.

An endpoint (or a proxy) that accepts a connection and never answers must not hang a user's script: every
request we start has a connect and a read timeout and a bounded number of attempts, so that a stalled endpoint
ends in about a minute in an error that names it and says what to do.

- Our own downloads (`harmonization.hub.download_file`: the published originals, ClickMe shards) use
  `timeout()` and `attempts()`.
- huggingface_hub's HTTP client has no timeout by default (its repo listing waits forever on a stalled Hub):
  `bound_huggingface_hub()` gives the client it shares a default timeout for every request that sets none.
  A client factory the user installed with `huggingface_hub.set_client_factory` is left alone.

`HARMONIZATION_NETWORK_TIMEOUT` (seconds, default 20) sets the timeout, read at each use.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Callable, TypeVar

__all__ = ["DEFAULT_ATTEMPTS", "DEFAULT_TIMEOUT", "TIMEOUT_ENV", "attempts", "bound_huggingface_hub",
           "offline_advice", "retry", "timeout"]

TIMEOUT_ENV = "HARMONIZATION_NETWORK_TIMEOUT"
#: Seconds to wait for a connection, or for the next bytes of an answer.
DEFAULT_TIMEOUT = 20.0
#: Tries of one download before giving up: a stalled endpoint costs at most about attempts x timeout.
DEFAULT_ATTEMPTS = 2
_RETRY_WAIT = 2.0  # seconds before the next attempt

T = TypeVar("T")


def timeout() -> float:
    """The connect/read timeout in seconds: `HARMONIZATION_NETWORK_TIMEOUT`, else 20."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds; got {text!r}.")
    return value


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
    """huggingface_hub's default client, with a timeout for every request that does not set its own."""
    import httpx2
    from huggingface_hub.utils import _http

    class BoundedTransport(httpx2.BaseTransport):
        """Fill the timeouts a request leaves unset (None = wait forever) with ours."""

        def __init__(self) -> None:
            self._inner = httpx2.HTTPTransport()

        def handle_request(self, request):
            limits = dict(request.extensions.get("timeout") or {})
            for key in ("connect", "read", "write", "pool"):
                if limits.get(key) is None:
                    limits[key] = timeout()
            request.extensions = {**request.extensions, "timeout": limits}
            return self._inner.handle_request(request)

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
