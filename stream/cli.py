"""The `stream` command: `run` (the service), `sandbox` (a local Samples API), `kafka` (a local broker),
`demo` (all of it end to end on generated data) and `generate` (wearable events into a topic).

The development tools live in stream/dev/ and are imported only inside their commands' branches, so `stream run`
never loads them (tests/unit/test_layout.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from stream import __version__, config, logs

if TYPE_CHECKING:
    from stream.metrics import HealthServer, Metrics
    from stream.pipeline import Pipeline

log = logging.getLogger("stream")

COMMANDS = {
    "run": "consume samples from Kafka and deliver them to the Samples API",
    "sandbox": "serve a local, strict Samples API (with fault injection)",
    "kafka": "run a local single-node Apache Kafka broker (resolved from Maven Central, cached)",
    "demo": "local Kafka + sandbox + generated wearable data + `stream run`, then a report",
    "generate": "write generated wearable events to a Kafka topic",
    "ledger": "show or forget what the sync ledger remembers of a user",
    "redrive": "send dead letters back to their topic once the cause is fixed",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "run":
        return run_main(rest)
    if command == "sandbox":
        from stream.dev import sandbox

        return sandbox.main(rest)
    if command == "kafka":
        from stream.dev import localkafka

        return localkafka.main(rest)
    if command == "demo":
        from stream.dev import demo

        return demo.main(rest)
    if command == "generate":
        from stream.dev import demo

        return demo.generate_main(rest)
    if command == "ledger":
        from stream import ledger_store

        return ledger_store.main(rest)
    if command == "redrive":
        from stream import redrive

        return redrive.main(rest)
    print(f"stream: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


def _usage() -> str:
    lines = ["usage: stream COMMAND [options]   (stream COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream run",
        description="Consume wearable sample events from Kafka, validate them, batch them per user and data "
        "type, POST them to {api_url}/samples and commit offsets only once the API accepted them. Every "
        "option can also be set by its STREAM_* environment variable; a flag wins over the variable.",
    )
    config.add_arguments(parser)
    return parser


def run_main(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    try:
        settings = config.load(overrides=config.overrides_from(args))
        settings.read_token()  # fail at start, not at the first request
        _check_kafka_files(settings)
    except config.ConfigError as exc:
        print(f"stream run: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    for name in config.unknown_variables():
        log.warning("unknown setting ignored", extra={"event": "unknown_setting", "variable": name})
    return asyncio.run(serve(settings))


def _check_kafka_files(settings: config.Settings) -> None:
    """Read the SASL password file and load the TLS files now, as the Kafka clients will: a wrong path is a
    configuration error (status 2) before anything listens or connects, not a traceback later."""
    from stream.kafka_options import kafka_client_options

    try:
        kafka_client_options(settings)
    except OSError as exc:  # ssl.SSLError is an OSError too
        names = [
            config.env_name(field)
            for field in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
            if getattr(settings, field)
        ]
        names = names or [config.env_name("kafka_security_protocol")]  # the system's CA bundle failed to load
        reason = exc.strerror or str(exc)
        raise config.ConfigError(f"{' / '.join(names)}: cannot load the TLS files ({reason})") from None


class StartupError(Exception):
    """`stream run` cannot start: one line for stderr, and the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _LateReady:
    """/readyz for a HealthServer that listens before the pipeline exists: "starting" until it does."""

    def __init__(self) -> None:
        self.pipeline: Pipeline | None = None
        self.waiting = "starting"  # what /readyz says while no pipeline runs

    def __call__(self) -> tuple[bool, str]:
        if self.pipeline is None:
            return False, self.waiting
        return self.pipeline.ready()


async def serve(settings: config.Settings) -> int:
    """Bind the metrics port, then build the pipeline (its Kafka clients) and run it until stopped.

    Order matters: everything that can be refused on this machine (settings, the port) is checked before
    any Kafka client exists, so a mistake ends with one line and status 2, never half-joined to the group.
    """
    from stream.metrics import HealthServer, Metrics

    metrics = Metrics()
    ready = _LateReady()
    health = HealthServer(metrics, ready, settings.metrics_port) if settings.metrics_port else None
    try:
        if health is not None:
            await _listen(health, settings.metrics_port)
        try:
            await _run_pipeline(settings, metrics, ready)
        finally:
            if health is not None:
                await health.stop()
    except StartupError as exc:
        print(f"stream run: {exc}", file=sys.stderr)
        return exc.status
    return 0


async def _listen(health: HealthServer, port: int) -> None:
    try:
        await health.start()
    except OSError as exc:  # EADDRINUSE, EACCES (a port below 1024 without the capability), EADDRNOTAVAIL
        await health.stop()
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        variable = config.env_name("metrics_port")
        raise StartupError(f"cannot listen on port {port} ({variable}): {reason}", status=2) from None


REBUILD_RETRY_FIRST_SECONDS = 1.0  # new Kafka clients the brokers refuse: tried again with backoff, up to
REBUILD_RETRY_MAX_SECONDS = 30.0


class _Runs:
    """The pipeline running now, and whether a signal asked the service to stop: the next pipeline (new Kafka
    clients after a credential change) must not start then."""

    def __init__(self) -> None:
        self.pipeline: Pipeline | None = None
        self.stopping = asyncio.Event()

    def stop(self) -> None:
        self.stopping.set()
        if self.pipeline is not None:
            self.pipeline.stop()


async def _run_pipeline(settings: config.Settings, metrics: Metrics, ready: _LateReady) -> None:
    """Run pipelines until a signal stops the service. One after another, in the same process, when the Kafka
    credential files change: each pipeline's clients load the files when built (stream/kafka_credentials.py)."""
    from aiokafka.errors import KafkaConnectionError

    from stream.kafka_credentials import CredentialsChanged
    from stream.ledger_store import LedgerTopicError
    from stream.pipeline import Pipeline
    from stream.token import TokenSource

    token = TokenSource(settings).current
    runs = _Runs()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runs.stop)
    rebuilding: CredentialsChanged | None = None  # why the pipeline about to start has new clients
    delay = REBUILD_RETRY_FIRST_SECONDS

    def rebuild(why: CredentialsChanged) -> None:
        nonlocal rebuilding
        rebuilding = why
        ready.pipeline, ready.waiting = None, "rebuilding the Kafka clients with the changed credential files"
        metrics.kafka_clients_rebuilt.inc()
        log.info("Kafka clients stopped; starting new ones with the changed credential files",
                 extra={"event": "kafka_clients_rebuilding", "variables": ",".join(why.variables)})

    try:
        while not runs.stopping.is_set():
            try:
                pipeline = Pipeline(settings, metrics, token=token)
            except (OSError, config.ConfigError) as exc:  # a credential file unreadable as it is now
                if rebuilding is None:
                    raise
                ready.waiting = "the changed Kafka credential files cannot be loaded"
                log.warning("cannot load the changed Kafka credential files; trying again",
                            extra={"event": "kafka_credentials_unusable", "error": _oneline(exc)})
                delay = await _pause(runs.stopping, delay)
                continue
            ready.pipeline = runs.pipeline = pipeline
            try:
                await pipeline.run()
            except LedgerTopicError as exc:
                # The ledger topic has fewer partitions than an input topic, or cannot be created: an operator's fix.
                await _close_quietly(pipeline)
                raise StartupError(f"{config.env_name('ledger_topic')}: {exc}", status=2) from None
            except CredentialsChanged as exc:  # while TLS failed, before any client started
                await _close_quietly(pipeline)
                log.warning(str(exc), extra={"event": "kafka_credentials_changed",
                                             "variables": ",".join(exc.variables)})
                rebuild(exc)
                continue
            except KafkaConnectionError:
                await _close_quietly(pipeline)
                if rebuilding is None:
                    # Raised when no bootstrap server answers at start (once running, the clients reconnect by
                    # themselves). Status 1, not 2: the address may be right and Kafka only down for now; a restart
                    # will try again.
                    variable = config.env_name("kafka_bootstrap_servers")
                    raise StartupError(
                        f"cannot reach Kafka at {settings.kafka_bootstrap_servers} ({variable}): no bootstrap "
                        "server answered",
                        status=1,
                    ) from None
                # New clients after a rotation: the brokers may not take the new credentials yet, or be away for a
                # moment. Not a reason to exit: try again, reading the files anew.
                ready.pipeline, ready.waiting = None, "the brokers refuse the new Kafka clients; trying again"
                if runs.stopping.is_set():
                    return
                log.warning("the new Kafka clients could not connect (credentials not yet accepted, or the brokers "
                            "away); trying again", extra={"event": "kafka_rebuild_failed",
                                                          "variables": ",".join(rebuilding.variables)})
                delay = await _pause(runs.stopping, delay)
                continue
            if pipeline.credentials_changed is None or runs.stopping.is_set():
                return
            rebuild(pipeline.credentials_changed)
            delay = REBUILD_RETRY_FIRST_SECONDS
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _pause(stopping: asyncio.Event, delay: float) -> float:
    """Wait `delay` seconds, or less if the service is asked to stop; the next, longer delay."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), timeout=delay)
    return min(delay * 2, REBUILD_RETRY_MAX_SECONDS)


def _oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


async def _close_quietly(pipeline: Pipeline) -> None:
    """Close the clients of a pipeline whose start failed half-way (closing one never started is harmless)."""
    for close in (pipeline.source.stop, pipeline.writer.stop, pipeline.sink.close):
        with contextlib.suppress(Exception):
            await close()


if __name__ == "__main__":
    sys.exit(main())
