"""Settings: loaded from STREAM_* variables and flags; a bad value fails loudly, naming the variable."""

from __future__ import annotations

import pytest

from stream.config import ConfigError, Settings, load, unknown_variables


def env(**values: str) -> dict[str, str]:
    return {f"STREAM_{name.upper()}": value for name, value in values.items()}


def error_for(environ: dict[str, str], overrides: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(environ, overrides)
    return str(caught.value)


# -- defaults and parsing ------------------------------------------------------------------------------


def test_defaults_without_any_variable():
    settings = load({})

    assert settings == Settings()
    assert settings.kafka_topics == ("samples",)
    assert settings.batch_max_samples == 1000
    assert settings.samples_url == "https://api-b2b.gerosense.ai/api/v2.2/samples"
    assert settings.input_topics == ("samples", "samples-sync-pending")  # derived from the group id


def test_values_come_from_stream_variables_and_are_converted():
    settings = load(
        env(batch_max_samples="250", batch_window_seconds="2.5", max_in_flight="4", metrics_port="0", log_level="debug")
    )

    assert settings.batch_max_samples == 250
    assert settings.batch_window_seconds == 2.5
    assert settings.max_in_flight == 4
    assert settings.metrics_port == 0


def test_topics_are_comma_separated_and_trimmed():
    assert load(env(kafka_topics="a, b,,c ")).kafka_topics == ("a", "b", "c")


def test_an_empty_variable_means_the_default():
    assert load(env(batch_max_samples="", api_url="")) == Settings()


def test_variables_without_the_prefix_are_ignored():
    assert load({"BATCH_MAX_SAMPLES": "3", "stream_batch_max_samples": "3"}).batch_max_samples == 1000


def test_flags_override_the_environment():
    settings = load(env(batch_max_samples="10", kafka_topics="a"), {"batch_max_samples": "20", "kafka_topics": "b,c"})

    assert settings.batch_max_samples == 20
    assert settings.kafka_topics == ("b", "c")


def test_a_flag_left_unset_keeps_the_environments_value():
    assert load(env(batch_max_samples="10"), {"batch_max_samples": None}).batch_max_samples == 10  # type: ignore[dict-item]


def test_the_samples_url_does_not_double_the_slash():
    assert load(env(api_url="http://localhost:8080/api/")).samples_url == "http://localhost:8080/api/samples"


# -- bad values name the variable ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"batch_max_samples": "2"}, "STREAM_BATCH_MAX_SAMPLES"),
        ({"batch_max_samples": "1001"}, "STREAM_BATCH_MAX_SAMPLES"),
        ({"batch_max_samples": "many"}, "STREAM_BATCH_MAX_SAMPLES"),
        ({"batch_window_seconds": "-1"}, "STREAM_BATCH_WINDOW_SECONDS"),
        ({"batch_window_seconds": "0"}, "STREAM_BATCH_WINDOW_SECONDS"),
        ({"batch_window_seconds": "five"}, "STREAM_BATCH_WINDOW_SECONDS"),
        ({"api_timeout_seconds": "nan"}, "STREAM_API_TIMEOUT_SECONDS"),
        ({"max_in_flight": "0"}, "STREAM_MAX_IN_FLIGHT"),
        ({"metrics_port": "65536"}, "STREAM_METRICS_PORT"),
        ({"kafka_max_poll_records": "0"}, "STREAM_KAFKA_MAX_POLL_RECORDS"),
        ({"log_level": "LOUD"}, "STREAM_LOG_LEVEL"),
        ({"api_url": "api-b2b.gerosense.ai/api/v2.2"}, "STREAM_API_URL"),
        ({"api_url": "ftp://example.com"}, "STREAM_API_URL"),
        ({"kafka_topics": " , "}, "STREAM_KAFKA_TOPICS"),
        ({"dlq_topic": "samples"}, "STREAM_DLQ_TOPIC"),
        ({"pending_topic": "samples"}, "STREAM_PENDING_TOPIC"),
        ({"min_batch_hold_seconds": "60", "min_batch_max_age_seconds": "30"}, "STREAM_MIN_BATCH_MAX_AGE_SECONDS"),
    ],
)
def test_a_bad_value_raises_config_error_naming_the_variable(values, variable):
    assert variable in error_for(env(**values))


def test_a_bad_flag_is_reported_under_its_variable_name_too():
    assert "STREAM_BATCH_MAX_SAMPLES" in error_for({}, {"batch_max_samples": "1001"})


@pytest.mark.parametrize("value", ["3", "1000"])
def test_the_batch_size_limits_themselves_are_allowed(value):
    assert load(env(batch_max_samples=value)).batch_max_samples == int(value)


@pytest.mark.parametrize("level", ["DEBUG", "info", "Warning", "ERROR"])
def test_known_log_levels_in_any_case_are_allowed(level):
    assert load(env(log_level=level)).log_level == level


# -- the token -----------------------------------------------------------------------------------------


def test_the_token_comes_from_the_environment():
    assert load(env(api_token="t0ken")).read_token() == "t0ken"


def test_the_token_file_wins_and_is_stripped(tmp_path):
    path = tmp_path / "token"
    path.write_text("  from-file\n")

    assert load(env(api_token="from-env", api_token_file=str(path))).read_token() == "from-file"


def test_no_token_at_all_is_an_error_naming_both_variables():
    with pytest.raises(ConfigError, match="STREAM_API_TOKEN or STREAM_API_TOKEN_FILE"):
        load({}).read_token()


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_token_file_is_an_error_naming_the_variable(tmp_path, content):
    path = tmp_path / "token"
    path.write_text(content)

    with pytest.raises(ConfigError, match="STREAM_API_TOKEN_FILE"):
        load(env(api_token_file=str(path))).read_token()


def test_a_missing_token_file_is_an_error_naming_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="STREAM_API_TOKEN_FILE"):
        load(env(api_token_file=str(tmp_path / "absent"))).read_token()


def test_repr_never_shows_the_token():
    settings = load(env(api_token="s3cr3t-t0ken"))

    assert "s3cr3t-t0ken" not in repr(settings)
    assert "s3cr3t-t0ken" not in str(settings)
    assert "s3cr3t-t0ken" not in f"{settings!r} {[settings]}"
    assert "api_token='***'" in repr(settings)
    assert "batch_max_samples=1000" in repr(settings)


def test_a_config_error_never_shows_the_token():
    message = error_for(env(api_token="s3cr3t-t0ken", batch_max_samples="0"))

    assert "s3cr3t-t0ken" not in message


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"STREAM_BATCH_WINDOW_SECONDS": "inf"}, "STREAM_BATCH_WINDOW_SECONDS"),
        ({"STREAM_API_URL": "https://"}, "STREAM_API_URL"),
        ({"STREAM_API_URL": "ftp://api.example"}, "STREAM_API_URL"),
    ],
)
def test_values_that_parse_but_make_no_sense_are_refused(values, variable):
    with pytest.raises(ConfigError, match=variable):
        load(values)


def test_spaces_around_a_number_are_forgiven():
    assert load({"STREAM_BATCH_MAX_SAMPLES": " 500 "}).batch_max_samples == 500


def test_a_misspelt_variable_is_reported_but_kubernetes_service_links_are_not():
    env = {"STREAM_BATCH_MAX_SAMPLE": "5", "STREAM_SERVICE_HOST": "10.0.0.1", "STREAM_PORT_9090_TCP": "tcp://x",
           "STREAM_API_TOKEN": "t"}
    assert unknown_variables(env) == ["STREAM_BATCH_MAX_SAMPLE"]


def test_pretty_printers_do_not_show_the_token_either():
    settings = load({"STREAM_API_TOKEN": "s3cret-token"})
    assert "s3cret-token" not in repr(list(settings.__rich_repr__()))


def test_the_group_timeouts_are_explicit_and_fit_the_revoke():
    settings = load({})
    # A revoke waits up to 15 s for requests, then commits (10 s): the group must wait longer than that.
    assert settings.revoke_budget_seconds == 15 + 10 + 5
    assert settings.kafka_rebalance_timeout_seconds >= settings.revoke_budget_seconds
    assert settings.kafka_session_timeout_seconds == 45


def test_a_revoke_that_would_outlast_the_rebalance_timeout_is_refused_at_start():
    with pytest.raises(ConfigError, match=r"STREAM_REVOKE_TIMEOUT_SECONDS.*STREAM_KAFKA_REBALANCE_TIMEOUT_SECONDS"):
        load({"STREAM_REVOKE_TIMEOUT_SECONDS": "50", "STREAM_KAFKA_REBALANCE_TIMEOUT_SECONDS": "60"})
    assert load({"STREAM_REVOKE_TIMEOUT_SECONDS": "45", "STREAM_KAFKA_REBALANCE_TIMEOUT_SECONDS": "60"})


def test_a_heartbeat_too_slow_for_the_session_is_refused():
    with pytest.raises(ConfigError, match="STREAM_KAFKA_HEARTBEAT_INTERVAL_SECONDS"):
        load({"STREAM_KAFKA_HEARTBEAT_INTERVAL_SECONDS": "20", "STREAM_KAFKA_SESSION_TIMEOUT_SECONDS": "45"})


def test_each_group_parks_in_a_topic_of_its_own_unless_told_otherwise():
    assert load({"STREAM_KAFKA_GROUP_ID": "blue"}).pending_topic == "blue-pending"
    assert load({"STREAM_KAFKA_GROUP_ID": "green"}).pending_topic == "green-pending"
    assert load({"STREAM_PENDING_TOPIC": "shared.pending"}).pending_topic == "shared.pending"
