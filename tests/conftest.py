"""Session-wide: after the run, one line per program that was missing, with how many tests skipped for it."""

from __future__ import annotations

from collections import Counter

from tests import tools


def pytest_terminal_summary(terminalreporter) -> None:
    if not tools.MISSING:
        return
    skipped: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):  # (path, line, "Skipped: <message>")
            message = report.longrepr[2].removeprefix("Skipped: ")
            if message in tools.MISSING:
                skipped[message] += 1
    if not skipped:
        return
    terminalreporter.section("missing tools")
    for message, count in skipped.items():
        name, how = tools.MISSING[message]
        tests = f"{count} tests" if count > 1 else "1 test"
        terminalreporter.write_line(f"SKIP {tests}: {name} not found; to run {'them' if count > 1 else 'it'}: {how}")
