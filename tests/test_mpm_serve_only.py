"""prefork.MPM (and ``prefork run``) refuse the ``[mpm]`` settings only ``prefork serve`` honours
(docs/configuration.md, ``[mpm]``): one line naming the source, the key and ``prefork serve``,
never a setting silently ignored."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from prefork import MPM
from prefork.config import load_config
from prefork.config.model import MPMConfig
from prefork.errors import ConfigError

#: a value other than the default for every setting only prefork serve honours
SERVE_ONLY = {
    "bind": "0.0.0.0:9000", "backlog": 512, "read_timeout": 2.0, "wsgi": "myapp:app", "max_header_bytes": 4096,
    "max_headers": 10, "max_body": 1000, "header_timeout": 3.0, "keepalive_timeout": 1.0,
}


def test_the_serve_only_settings_are_the_ones_marked_so() -> None:
    marked = {f.name for f in attrs.fields(MPMConfig) if f.metadata.get("serve_only")}
    assert marked == set(SERVE_ONLY)


@pytest.mark.parametrize("key", SERVE_ONLY)
def test_mpm_refuses_a_setting_only_prefork_serve_honours(key: str) -> None:
    value = SERVE_ONLY[key]
    with pytest.raises(ConfigError) as caught:
        MPM(overrides={f"mpm.{key}": value})
    assert str(caught.value) == (
        f"keyword arguments: mpm.{key} = {value!r}: honoured by `prefork serve` only; prefork.MPM (and `prefork run`) "
        "binds nothing: its children find their own work. Remove it, or start this config with `prefork serve`"
    )


def test_a_file_that_sets_one_is_named_even_with_the_default_value(tmp_path: Path) -> None:
    path = tmp_path / "prefork.toml"
    path.write_text('profile = "mpm"\n[mpm]\nbind = "127.0.0.1:8000"\n')  # the default, but set: still ignored
    with pytest.raises(ConfigError, match=rf"^{path}: mpm.bind = '127.0.0.1:8000': honoured by `prefork serve` only"):
        MPM(config=path)


def test_from_config_refuses_one_changed_in_code() -> None:
    config = load_config(None, {"profile": "mpm"})
    changed = attrs.evolve(config, mpm=attrs.evolve(config.mpm, keepalive_timeout=9.0))
    with pytest.raises(ConfigError, match=r"^the configuration: mpm.keepalive_timeout = 9.0: honoured by `prefork serve`"):
        MPM.from_config(changed)


def test_what_the_mpm_honours_is_accepted() -> None:
    """The profile's own bind and backlog, and the settings an MPM does honour."""
    m = MPM(start_servers=1, overrides={"mpm.request_timeout": 5, "mpm.data_hook_in_main": True,
                                        "mpm.child_sigh": {"HUP": "IGNORE"}})
    assert m.config.mpm.request_timeout == 5.0 and m.pids() == []


def test_prefork_run_refuses_one_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "mpmapp.py").write_text("def main(server):\n    return 0\n")
    (tmp_path / "prefork.toml").write_text('profile = "mpm"\napp = "mpmapp:main"\n[mpm]\nmax_body = 10\n')
    out = subprocess.run([sys.executable, "-m", "prefork", "run"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "prefork: error: prefork.toml: mpm.max_body = 10: honoured by `prefork serve` only; prefork.MPM (and "
        "`prefork run`) binds nothing: its children find their own work. Remove it, or start this config with "
        "`prefork serve`"
    ]
