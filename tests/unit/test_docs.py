"""The README and `stream run --help` list every setting and every dead-letter reason the code has."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.cli import run_parser
from stream.config import Settings, env_name, flag_name
from stream.schema import REASONS

README = (Path(__file__).parents[2] / "README.md").read_text()


@pytest.mark.parametrize("field", Settings.__struct_fields__)
def test_every_setting_is_in_the_readme_and_in_run_help(field):
    assert f"`{env_name(field)}`" in README
    help_text = run_parser().format_help()
    assert flag_name(field) in help_text
    assert env_name(field) in help_text


@pytest.mark.parametrize("reason", [*REASONS])
def test_every_dead_letter_reason_is_documented(reason):
    assert f"| `{reason}` |" in README
