"""The HTTP side: POST one batch body to {api}/samples and return a typed outcome. The only aiohttp client."""

from __future__ import annotations

import logging
from collections.abc import Callable

import aiohttp

from stream import __version__
from stream.outcome import Outcome, Retry, classify

log = logging.getLogger("stream.sink")


class SamplesSink:
    """One keep-alive session for all requests; the token is read through `token()` at each request so a
    rotated token file takes effect without a restart."""

    def __init__(self, url: str, token: Callable[[], str], timeout: float, max_connections: int) -> None:
        self._url = url
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

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
            async with self._session.post(self._url, data=body, headers=headers) as response:
                payload = await response.read()
                return response.status, classify(response.status, response.headers, payload)
        except TimeoutError:
            return None, Retry("timeout")
        except aiohttp.ClientError as exc:
            return None, Retry(type(exc).__name__)
