"""TokenSource: a rotated token file takes effect without a restart (checked at most once a second)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stream.config import ConfigError, load
from stream.token import CHECK_EVERY, TokenSource


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rotate(path: Path, content: str) -> None:
    """Write new content and move the mtime clearly forward, whatever the filesystem's granularity."""
    before = path.stat().st_mtime_ns
    path.write_text(content)
    os.utime(path, ns=(before + 5_000_000_000, before + 5_000_000_000))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("first-token\n")
    return path


def source(path: Path, clock: Clock) -> TokenSource:
    return TokenSource(load({"STREAM_API_TOKEN_FILE": str(path)}), clock)


def test_the_token_from_the_environment_never_changes():
    clock = Clock()
    tokens = TokenSource(load({"STREAM_API_TOKEN": "env-token"}), clock)
    clock.now += 3600

    assert tokens.current() == "env-token"


def test_the_file_token_is_read_at_start(token_file):
    assert source(token_file, Clock()).current() == "first-token"


def test_a_rotated_file_is_picked_up_after_the_check_interval(token_file):
    clock = Clock()
    tokens = source(token_file, clock)

    rotate(token_file, "second-token-longer")
    clock.now += CHECK_EVERY / 2
    assert tokens.current() == "first-token"  # not re-checked more than once a second

    clock.now += CHECK_EVERY / 2
    assert tokens.current() == "second-token-longer"


def test_a_rotation_to_a_token_of_the_same_length_is_picked_up(token_file):
    clock = Clock()
    tokens = source(token_file, clock)

    rotate(token_file, "other-token\n")
    clock.now += CHECK_EVERY

    assert tokens.current() == "other-token"


def test_every_rotation_is_picked_up(token_file):
    clock = Clock()
    tokens = source(token_file, clock)

    for n in range(3):
        rotate(token_file, f"token-{n}")
        clock.now += CHECK_EVERY
        assert tokens.current() == f"token-{n}"


def test_an_empty_file_mid_rotation_keeps_the_previous_token_then_takes_the_new_one(token_file):
    clock = Clock()
    tokens = source(token_file, clock)

    rotate(token_file, "")
    clock.now += CHECK_EVERY
    assert tokens.current() == "first-token"

    rotate(token_file, "new-token")
    clock.now += CHECK_EVERY
    assert tokens.current() == "new-token"


def test_a_deleted_file_keeps_the_previous_token(token_file):
    clock = Clock()
    tokens = source(token_file, clock)
    token_file.unlink()
    clock.now += CHECK_EVERY

    assert tokens.current() == "first-token"


def test_an_empty_file_at_start_is_an_error(tmp_path):
    path = tmp_path / "token"
    path.write_text("")

    with pytest.raises(ConfigError, match="STREAM_API_TOKEN_FILE"):
        source(path, Clock())
