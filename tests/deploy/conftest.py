"""Fixtures for the deploy tests: the chart rendered by the real helm binary.

Tests that render need helm ($HELM, on PATH, or where `go install` puts it): without it they skip with how to
get it, or fail under CI (tests/tools.py). .ci/deploy-checks installs helm when Go is there.
The test modules skip as a whole when PyYAML is missing (it comes with the package's test extras).
"""

from __future__ import annotations

import pytest

from tests.tools import require_tool


@pytest.fixture(scope="session")
def helm() -> str:
    from tests.deploy import chart

    return require_tool("helm", locate=lambda _: chart.helm_binary())


@pytest.fixture(scope="session")
def render(helm):
    """render(values_files=(), values=None, **kwargs) -> the rendered documents."""
    from tests.deploy import chart

    def _render(values_files=(), values=None, **kwargs):
        return chart.render(values_files, values, helm=helm, **kwargs)

    return _render


@pytest.fixture(scope="session")
def render_error(helm):
    """render_error(...) -> the RenderError of a render that must fail."""
    from tests.deploy import chart

    def _render_error(values_files=(), values=None, **kwargs):
        with pytest.raises(chart.RenderError) as info:
            chart.render(values_files, values, helm=helm, **kwargs)
        return info.value

    return _render_error


@pytest.fixture(scope="session")
def ci_renders(render) -> dict[str, list[dict]]:
    """Every values file under helm/stream/ci/, rendered once."""
    from tests.deploy import chart

    return {path.stem: render([path]) for path in chart.CI_VALUES}
