"""The documentation site: mkdocs.yml builds with ``mkdocs build --strict`` (no warning: a
broken link or anchor, a page missing from the nav, a docstring that does not parse or a
cross-reference to a name that does not exist fails it), and the API reference documents
every name of ``prefork.__all__``.

One build, into a temporary directory.  Without mkdocs (``pip install '.[docs]'``) the
test is skipped, except under CI, where that is a failure.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import prefork

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def test_the_site_builds_strictly_with_the_whole_public_api(tmp_path: Path) -> None:
    missing = [name for name in NEEDED if importlib.util.find_spec(name.partition(".")[0]) is None
               or importlib.util.find_spec(name) is None]
    if missing:
        reason = f"{', '.join(missing)} not installed (pip install '.[docs]'): the documentation site cannot be built"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    problems = [line for line in proc.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert proc.returncode == 0 and not problems, "\n".join(problems) or proc.stderr[-3000:]

    home = (site / "index.html").read_text(encoding="utf-8")
    assert "What it is" in home and 'href="plugins/"' in home  # README.md, its docs/ links made the site's
    api = "".join(p.read_text(encoding="utf-8") for p in (site / "api").rglob("index.html"))
    undocumented = [name for name in prefork.__all__ if name != "__version__" and f'id="prefork.{name}"' not in api]
    assert not undocumented, f"names in prefork.__all__ with no entry in docs/api/: {undocumented}"
    for kind in ("ScalingPolicy", "Transport", "Serializer", "MethodResolver", "ResultSink"):  # the plugin surfaces
        assert f'id="prefork.{kind}"' in api
    hooks = [name for name in dir(prefork.hookspecs) if name.startswith("prefork_")]
    assert hooks and all(f'id="prefork.hookspecs.{name}"' in api for name in hooks)
    contracts = [name for name in dir(prefork.testing) if name.endswith("Contract")]
    assert len(contracts) == 5 and all(f'id="prefork.testing.{name}"' in api for name in contracts)
    assert not re.search(r":(class|func|meth|mod|attr|exc):`", api), "a Sphinx role left as text in the API pages"
