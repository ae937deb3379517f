"""Contender (c): the whole job written with Quix Streams (PyPI ``quixstreams``), as a Quix user would.

``app.dataframe(topic).sink(SamplesSink(...))``: Quix consumes the topic (confluent-kafka/librdkafka under
the hood) and deserializes each value with its JSON deserializer (orjson); the sink keeps one buffer per
(user_id, data_type), POSTs a buffer as soon as it holds 1000 samples, and on every Quix checkpoint
(``commit_interval``, 5 s by default, and on revoke/shutdown) POSTs every buffer of 3 or more samples and
waits for every request, so Quix commits offsets only after the API accepted what they carried. A buffer of
1-2 samples cannot be sent (the API refuses fewer than 3) nor dropped, so it is *parked* like the service
does: written as one bundle to a pending topic (acknowledged before the checkpoint commits) that the same
app consumes, so it comes back and joins the user's later samples. Requests go out on a thread pool of
``max_in_flight`` workers (16, as the service's default), with one request per key in flight at a time, and
are retried with backoff on 429, 5xx and connection errors.

Less than the service does (noted in the results): no per-sample validation before the API (the sandbox
still checks every sample), no dead-letter topic (a sample the API refuses is only counted), no maximum age
for parked samples, no adaptive concurrency. Run as a subprocess by the benchmark.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import orjson
import urllib3
from quixstreams import Application
from quixstreams.sinks.base import BaseSink

log = logging.getLogger("bench.quix")

MAX_SAMPLES = 1000
MIN_SAMPLES = 3
SAMPLE_FIELDS = ("device_name", "device_version", "start_date", "end_date", "value", "unit")
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class SamplesSink(BaseSink):
    def __init__(self, api_url: str, token: str, producer: Any, pending_topic: str, max_in_flight: int = 16):
        super().__init__()
        url = urlsplit(api_url)
        self._path = url.path.rstrip("/") + "/samples"
        self._http = urllib3.HTTPConnectionPool(
            url.hostname, url.port or 80, maxsize=max_in_flight, block=True, retries=False, timeout=30.0
        )
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="post")
        self._producer = producer
        self._pending_topic = pending_topic
        self._buffers: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._in_flight: list[Future[None]] = []
        self._last: dict[tuple[str, str], Future[None]] = {}  # one request per key at a time: in order
        self._lock = threading.Lock()
        self.refused = 0

    # -- Quix calls these on its processing thread

    def add(self, value: Any, key: Any, timestamp: int, headers: Any, topic: str, partition: int, offset: int):
        user_id, data_type = value["user_id"], value["data_type"]
        data = value.get("data")
        if data is None:  # one sample
            samples = [{f: value[f] for f in SAMPLE_FIELDS if f in value}]
        else:  # a parked bundle coming back
            samples = data
        buffer = self._buffers.get((user_id, data_type))
        if buffer is None:
            buffer = self._buffers[(user_id, data_type)] = []
        buffer.extend(samples)
        while len(buffer) >= MAX_SAMPLES:
            self._send((user_id, data_type), buffer[:MAX_SAMPLES])
            del buffer[:MAX_SAMPLES]

    def flush(self) -> None:
        """A checkpoint: everything buffered is sent or parked, and acknowledged, before Quix commits."""
        parked = 0
        for key, buffer in self._buffers.items():
            if len(buffer) >= MIN_SAMPLES:
                self._send(key, buffer)
            elif buffer:
                user_id, data_type = key
                value = orjson.dumps({"user_id": user_id, "data_type": data_type, "data": buffer})
                self._producer.produce(topic=self._pending_topic, key=user_id.encode(), value=value)
                parked += 1
        self._buffers = {}
        in_flight, self._in_flight = self._in_flight, []
        self._last.clear()
        for future in in_flight:
            future.result()  # raises: the checkpoint is aborted, nothing is committed
        if parked and self._producer.flush(30.0):
            raise RuntimeError("parked buffers not acknowledged by Kafka")

    # -- HTTP

    def _send(self, key: tuple[str, str], samples: list[dict[str, Any]]) -> None:
        body = orjson.dumps({"user_id": key[0], "data_type": key[1], "data": samples})
        previous = self._last.get(key)
        future = self._pool.submit(self._post, body, previous)
        self._last[key] = future
        self._in_flight.append(future)

    def _post(self, body: bytes, previous: Future[None] | None) -> None:
        if previous is not None:
            previous.result()  # the key's previous batch first (it was submitted earlier, so it runs already)
        delay = 0.05
        for _attempt in range(60):
            try:
                response = self._http.urlopen("POST", self._path, body=body, headers=self._headers)
            except urllib3.exceptions.HTTPError:
                status = None
            else:
                status = response.status
                if status == 200:
                    return
                if status in (207, 400):
                    answer = orjson.loads(response.data)
                    with self._lock:
                        self.refused += len(answer.get("rejected", ())) or 1
                    return
                if status not in RETRY_STATUSES:
                    raise RuntimeError(f"POST /samples answered {status}: {response.data[:200]!r}")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        raise RuntimeError(f"POST /samples kept failing (last status {status})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quix_job", description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--pending-topic", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--api-url", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--commit-interval", type=float, default=5.0, help="Quix's default")
    p.add_argument("--max-in-flight", type=int, default=16)
    args = p.parse_args(argv)

    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        commit_interval=args.commit_interval,
        state_dir=args.state_dir,
        use_changelog_topics=False,  # stateless job
        loglevel="WARNING",
    )
    producer = app.get_producer()
    sink = SamplesSink(args.api_url, args.token, producer, args.pending_topic, args.max_in_flight)
    app.dataframe(app.topic(args.topic, value_deserializer="json")).sink(sink)
    app.dataframe(app.topic(args.pending_topic, value_deserializer="json")).sink(sink)
    try:
        app.run()  # until SIGTERM
    finally:
        producer.flush(10.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
