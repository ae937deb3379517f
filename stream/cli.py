"""The `stream` command: `run` (the service), `sandbox` (a local Samples API), `kafka` (a local broker),
`demo` (all of it end to end on generated data) and `generate` (wearable events into a topic)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from stream import __version__, config, logs

log = logging.getLogger("stream")

COMMANDS = {
    "run": "consume samples from Kafka and deliver them to the Samples API",
    "sandbox": "serve a local, strict Samples API (with fault injection)",
    "kafka": "run a local single-node Apache Kafka broker (resolved from Maven Central, cached)",
    "demo": "local Kafka + sandbox + generated wearable data + `stream run`, then a report",
    "generate": "write generated wearable events to a Kafka topic",
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
        from stream import sandbox

        return sandbox.main(rest)
    if command == "kafka":
        from stream import localkafka

        return localkafka.main(rest)
    if command == "demo":
        from stream import demo

        return demo.main(rest)
    if command == "generate":
        from stream import demo

        return demo.generate_main(rest)
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
    except config.ConfigError as exc:
        print(f"stream run: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    for name in config.unknown_variables():
        log.warning("unknown setting ignored", extra={"event": "unknown_setting", "variable": name})
    return asyncio.run(serve(settings))


async def serve(settings: config.Settings) -> int:
    from stream.metrics import HealthServer, Metrics
    from stream.pipeline import Pipeline
    from stream.token import TokenSource

    metrics = Metrics()
    pipeline = Pipeline(settings, metrics, token=TokenSource(settings).current)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pipeline.stop)
    health = HealthServer(metrics, pipeline.ready, settings.metrics_port) if settings.metrics_port else None
    if health is not None:
        await health.start()
    try:
        await pipeline.run()
    finally:
        if health is not None:
            await health.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
