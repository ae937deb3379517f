"""The HTTP side: POST one batch body to {api}/samples and return a typed outcome. The only aiohttp client.

Redirects are never followed: a 301/302/303 would be re-sent as a GET without the body (and that page's
200 would pass for an acceptance), a 307/308 to another origin would lose the Authorization header. A 3xx
comes back as Retry("redirect", retry_after, location) and is logged (event "api_redirect": status and
Location, never the token or the body) at most once a minute, with the number of lines left out since.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import aiohttp

from stream import __version__
from stream.logs import RateLimited
from stream.outcome import Outcome, Retry, classify

log = logging.getLogger("stream.sink")

REDIRECT_LOG_EVERY = 60.0  # seconds between two "api_redirect" lines
LOCATION_EXCERPT = 300  # characters of a Location header kept in the log


class SamplesSink:
    """One keep-alive session for all requests; the token is read through `token()` at each request so a
    rotated token file takes effect without a restart."""

    def __init__(
        self,
        url: str,
        token: Callable[[], str],
        timeout: float,
        max_connections: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._redirect_log = RateLimited(REDIRECT_LOG_EVERY, clock)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            headers={"Content-Type": "application/json", "User-Agent": f"stream/{__version__}"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, body: bytes) -> tuple[int | None, Outcome]:
        """(HTTP status or None, outcome). Delivery problems are outcomes, never exceptions."""
        assert self._session is not None, "start() first"
        headers = {"Authorization": f"Bearer {self._token()}"}
        try:
            async with self._session.post(self._url, data=body, headers=headers, allow_redirects=False) as response:
                payload = await response.read()
                outcome = classify(response.status, response.headers, payload)
        except TimeoutError:
            return None, Retry("timeout")
        except aiohttp.ClientError as exc:
            return None, Retry(type(exc).__name__)
        if isinstance(outcome, Retry) and outcome.reason == "redirect":
            self._log_redirect(response.status, outcome.location)
        return response.status, outcome

    def _log_redirect(self, status: int, location: str | None) -> None:
        suppressed = self._redirect_log.take()
        if suppressed is None:
            return
        if location is not None and len(location) > LOCATION_EXCERPT:
            location = location[:LOCATION_EXCERPT] + "…"
        log.warning(
            "the API answered with a redirect; not followed, the batch is retried (check STREAM_API_URL)",
            extra={"event": "api_redirect", "status": status, "location": location, "suppressed": suppressed},
        )
