"""The API token: from STREAM_API_TOKEN, or from STREAM_API_TOKEN_FILE re-read when the file changes.

Kubernetes updates a mounted Secret in place; checking the file's mtime at most once a second lets a
rotated token take effect without a restart, at no cost per request.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from stream.config import ConfigError, Settings

log = logging.getLogger("stream.token")

CHECK_EVERY = 1.0


class TokenSource:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._stamp = self._file_stamp()  # before reading: a rotation in between is seen at the next check
        self._token = settings.read_token()
        self._checked = clock()

    def _file_stamp(self) -> tuple[int, int] | None:
        if not self._settings.api_token_file:
            return None
        try:
            st = os.stat(self._settings.api_token_file)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def current(self) -> str:
        now = self._clock()
        if self._settings.api_token_file and now - self._checked >= CHECK_EVERY:
            self._checked = now
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                self._reload(stamp)
        return self._token

    def _reload(self, stamp: tuple[int, int]) -> None:
        try:
            token = self._settings.read_token()
        except ConfigError as exc:
            log.warning("token file unreadable, keeping the previous token",
                        extra={"event": "token_reload_failed", "error": str(exc)})
            return
        self._token, self._stamp = token, stamp
        log.info("API token reloaded from file", extra={"event": "token_reloaded"})
