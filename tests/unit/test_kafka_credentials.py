"""Kafka credential rotation without a pod restart: which files are watched, when a change counts, how the
pipeline stops for it, and how `stream run` builds new clients in the same process (refused ones retried)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import msgspec
import pytest
from aiokafka.errors import KafkaConnectionError

from stream import cli, config
from stream.kafka_credentials import CredentialsChanged, CredentialWatch, changed, credential_files, fingerprints
from stream.pipeline import Pipeline

from .test_refusal_hold import Source, Writer


def settings(**values: object) -> config.Settings:
    return msgspec.convert({"api_token": "t", "ledger": "off", "metrics_port": 0, **values}, config.Settings)


def files(tmp_path: Path) -> dict[str, str]:
    paths = {}
    for name in ("password", "ca.crt", "tls.crt", "tls.key"):
        (tmp_path / name).write_text(f"{name} one\n")
        paths[name] = str(tmp_path / name)
    return paths


def every_file(tmp_path: Path, protocol: str) -> config.Settings:
    p = files(tmp_path)
    return settings(kafka_security_protocol=protocol, kafka_sasl_username="u", kafka_sasl_password_file=p["password"],
                    kafka_ssl_cafile=p["ca.crt"], kafka_ssl_certfile=p["tls.crt"], kafka_ssl_keyfile=p["tls.key"])


@pytest.mark.parametrize(("protocol", "watched"), [
    ("PLAINTEXT", []),
    ("SASL_PLAINTEXT", ["STREAM_KAFKA_SASL_PASSWORD_FILE"]),
    ("SSL", ["STREAM_KAFKA_SSL_CAFILE", "STREAM_KAFKA_SSL_CERTFILE", "STREAM_KAFKA_SSL_KEYFILE"]),
    ("SASL_SSL", ["STREAM_KAFKA_SASL_PASSWORD_FILE", "STREAM_KAFKA_SSL_CAFILE", "STREAM_KAFKA_SSL_CERTFILE",
                  "STREAM_KAFKA_SSL_KEYFILE"]),
])
def test_only_the_files_the_clients_load_are_watched(tmp_path: Path, protocol: str, watched: list[str]):
    # A TLS file set but unused (PLAINTEXT) changing must not rebuild the clients for nothing.
    assert sorted(credential_files(every_file(tmp_path, protocol))) == sorted(watched)


def test_a_password_given_directly_is_not_a_file_to_watch():
    s = settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u", kafka_sasl_password="p")
    assert credential_files(s) == {}
    assert not CredentialWatch.of(s).watching


def test_a_change_counts_once_two_looks_agree_on_it(tmp_path: Path):
    s = every_file(tmp_path, "SASL_SSL")
    watch = CredentialWatch.of(s)
    assert watch.look(fingerprints(s)) == []  # nothing changed
    Path(s.kafka_ssl_certfile).write_text("renewed, half written")
    assert watch.look(fingerprints(s)) == []  # first seen: may still be moving
    Path(s.kafka_ssl_certfile).write_text("renewed\n")
    Path(s.kafka_ssl_keyfile).write_text("renewed key\n")
    assert watch.look(fingerprints(s)) == []  # moved again since: not settled
    assert watch.look(fingerprints(s)) == ["STREAM_KAFKA_SSL_CERTFILE", "STREAM_KAFKA_SSL_KEYFILE"]


def test_a_change_undone_before_it_settled_is_no_change(tmp_path: Path):
    s = every_file(tmp_path, "SASL_PLAINTEXT")
    watch = CredentialWatch.of(s)
    Path(s.kafka_sasl_password_file).write_text("new\n")
    assert watch.look(fingerprints(s)) == []
    Path(s.kafka_sasl_password_file).write_text("password one\n")
    assert watch.look(fingerprints(s)) == []
    assert watch.look(fingerprints(s)) == []


def test_a_file_being_swapped_away_is_a_change_not_a_crash(tmp_path: Path):
    s = every_file(tmp_path, "SASL_PLAINTEXT")
    loaded = fingerprints(s)
    os.remove(s.kafka_sasl_password_file)
    assert changed(loaded, fingerprints(s)) == ["STREAM_KAFKA_SASL_PASSWORD_FILE"]


def test_the_reason_names_the_variables_never_the_contents(tmp_path: Path):
    text = str(CredentialsChanged(["STREAM_KAFKA_SASL_PASSWORD_FILE"]))
    assert "STREAM_KAFKA_SASL_PASSWORD_FILE" in text and "password one" not in text


def test_an_unreadable_file_never_settles(tmp_path: Path):
    # The clients built from the old file keep working; new ones could not even be built.
    s = every_file(tmp_path, "SASL_PLAINTEXT")
    watch = CredentialWatch.of(s)
    os.remove(s.kafka_sasl_password_file)
    assert [watch.look(fingerprints(s)) for _ in range(3)] == [[], [], []]
    Path(s.kafka_sasl_password_file).write_text("back, new\n")
    assert watch.look(fingerprints(s)) == []
    assert watch.look(fingerprints(s)) == ["STREAM_KAFKA_SASL_PASSWORD_FILE"]


def watched_pipeline(tmp_path: Path, logins: list[str | None], sleeps: list[float]) -> Pipeline:
    """A pipeline watching a password file that is rotated during its first sleep; `logins`: what each trial
    login with the new file answers (None: accepted)."""
    s = every_file(tmp_path, "SASL_PLAINTEXT")
    clock = [0.0]

    def rotate() -> None:  # the kubelet swapped the Secret's file
        Path(s.kafka_sasl_password_file).write_text("rotated\n")

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds
        if len(sleeps) == 1:
            rotate()

    async def try_login(_settings) -> str | None:
        return logins.pop(0)

    p = Pipeline(s, source=Source(), writer=Writer(), sink=object(), sleep=sleep, clock=lambda: clock[0])
    p._try_login = try_login
    return p


async def test_the_pipeline_stops_for_new_clients_once_the_password_file_changed(tmp_path: Path):
    sleeps: list[float] = []
    p = watched_pipeline(tmp_path, [None], sleeps)
    await asyncio.wait_for(p._watch_credentials(10.0), 5)

    # Seen after the first look, taken at the second that agreed, then a spread of at most 30 s before the drain.
    assert sleeps[:2] == [10.0, 10.0] and len(sleeps) == 3 and 0 <= sleeps[2] <= 30
    assert p.credentials_changed is not None
    assert p.credentials_changed.variables == ["STREAM_KAFKA_SASL_PASSWORD_FILE"]
    assert p._stopping.is_set()  # run() drains and commits, as for a shutdown


async def test_files_the_brokers_refuse_do_not_stop_a_pipeline_that_works(tmp_path: Path, caplog):
    # The file came before the brokers had the new password: draining now would leave every member of the group
    # out, each waiting for the brokers. The old clients go on; the login is tried again every 30 s.
    sleeps: list[float] = []
    p = watched_pipeline(tmp_path, ["refused", "refused", None], sleeps)
    with caplog.at_level("WARNING"):
        await asyncio.wait_for(p._watch_credentials(10.0), 5)

    assert p.credentials_changed is not None and p._stopping.is_set()
    assert sum(sleeps[:-1]) == 20 + 30 + 30  # two looks, then a try every 30 s (each look 10 s apart)
    refusals = [r for r in caplog.records if getattr(r, "event", "") == "kafka_credentials_not_accepted"]
    assert len(refusals) == 1  # said once for this change, not at every try


async def test_a_new_pipeline_clears_what_the_old_one_left_in_the_metrics(tmp_path: Path):
    # aiokafka's stop does not call the revoke callback: the old partitions' series and the failure flags would
    # stay frozen (lag counted twice, StreamApiAuthFailure firing for ever).
    from stream.metrics import Metrics

    metrics = Metrics()
    old = Pipeline(settings(), metrics, source=Source(), writer=Writer(), sink=object())
    metrics.lag.labels("samples", "3").set(500)
    metrics.committed_offset.labels("samples", "3").set(42)
    for flag in (metrics.paused, metrics.auth_failure, metrics.refusal_storm):
        flag.set(1)
    del old

    Pipeline(settings(), metrics, source=Source(), writer=Writer(), sink=object())

    value = metrics.registry.get_sample_value
    assert value("stream_consumer_lag", {"topic": "samples", "partition": "3"}) is None
    assert value("stream_committed_offset", {"topic": "samples", "partition": "3"}) is None
    assert [value(n) for n in ("stream_fetch_paused", "stream_api_auth_failure", "stream_api_refusal_storm")] == [0] * 3


class Runs:
    """Fake pipelines for `stream run`'s loop: what each run does, in order."""

    def __init__(self, *plays) -> None:
        self.plays = list(plays)
        self.built = 0

    def pipeline(self, settings, metrics, token):
        runs, play = self, self.plays[self.built]
        self.built += 1

        class Client:
            async def stop(self) -> None:
                pass

            close = stop

        class FakePipeline:
            credentials_changed = None
            source = writer = sink = Client()

            def __init__(self) -> None:
                self.stopped = asyncio.Event()

            def ready(self) -> tuple[bool, str]:
                return False, "fake"

            def stop(self) -> None:
                self.stopped.set()

            async def run(self) -> None:
                await play(self)

        del runs
        return FakePipeline()


async def rotated(p) -> None:
    p.credentials_changed = CredentialsChanged(["STREAM_KAFKA_SASL_PASSWORD_FILE"])


async def refused(p) -> None:
    raise KafkaConnectionError("Unable to bootstrap")


async def stopped(p) -> None:
    pass


async def serve(runs: Runs, monkeypatch: pytest.MonkeyPatch) -> int:
    import stream.pipeline

    monkeypatch.setattr(stream.pipeline, "Pipeline", runs.pipeline)
    monkeypatch.setattr(cli, "REBUILD_RETRY_FIRST_SECONDS", 0.001)
    return await asyncio.wait_for(cli.serve(settings()), 10)


async def test_stream_run_builds_new_clients_in_the_process_after_a_change(monkeypatch: pytest.MonkeyPatch):
    runs = Runs(rotated, stopped)
    assert await serve(runs, monkeypatch) == 0
    assert runs.built == 2


async def test_new_clients_the_brokers_refuse_are_tried_again_not_an_exit(monkeypatch: pytest.MonkeyPatch):
    # The file came before the brokers had the new password: a crash loop would restart the pod for nothing.
    runs = Runs(rotated, refused, refused, stopped)
    assert await serve(runs, monkeypatch) == 0
    assert runs.built == 4


async def test_kafka_unreachable_at_the_very_start_still_exits_1(monkeypatch: pytest.MonkeyPatch, capsys):
    runs = Runs(refused)
    assert await serve(runs, monkeypatch) == 1
    assert "cannot reach Kafka" in capsys.readouterr().err


async def test_a_stop_asked_while_refused_clients_wait_ends_the_wait(monkeypatch: pytest.MonkeyPatch):
    async def refused_then_terminated(p) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the backoff pause that follows
        raise KafkaConnectionError("Unable to bootstrap")

    monkeypatch.setattr(cli, "REBUILD_RETRY_FIRST_SECONDS", 3600.0)  # only the stop can end this pause
    runs = Runs(rotated, refused_then_terminated, stopped)
    import stream.pipeline

    monkeypatch.setattr(stream.pipeline, "Pipeline", runs.pipeline)
    assert await asyncio.wait_for(cli.serve(settings()), 10) == 0
    assert runs.built == 2


async def test_a_stop_asked_during_the_drain_for_new_clients_builds_none(monkeypatch: pytest.MonkeyPatch):
    async def rotated_while_terminated(p) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # the pod is being deleted while it drains for the rotation
        await p.stopped.wait()  # the signal reached the service
        p.credentials_changed = CredentialsChanged(["STREAM_KAFKA_SSL_CAFILE"])

    runs = Runs(rotated_while_terminated, stopped)
    assert await serve(runs, monkeypatch) == 0
    assert runs.built == 1
