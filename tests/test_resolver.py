"""``import_object``: the import paths every facade, the CLI and the redis plugin accept."""

from __future__ import annotations

import collections
import os.path
import re
from pathlib import Path
from typing import Any

import pytest

from prefork.strategies.resolver import ImportResolver, import_object, is_private


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("os.path:join", os.path.join), ("os.path.join", os.path.join),  # the older form: module, then one attribute
     ("collections:OrderedDict.fromkeys", collections.OrderedDict.fromkeys), ("os:path", os.path),
     ("prefork.strategies.resolver:ImportResolver.resolve", ImportResolver.resolve)],
)  # fmt: skip
def test_both_forms_resolve(spec: str, expected: Any) -> None:
    assert import_object(spec) == expected


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [("abs", ImportError, "'abs' is not of the form 'module:attribute'"),
     ("my-app:main", ImportError, "'my-app:main' is not of the form 'module:attribute'"),
     ("os.", ImportError, "'os.' is not of the form"),
     ("os:system\n", ImportError, "'os:system\\n' is not of the form"),
     ("no_such_mod_x:fn", ModuleNotFoundError, "No module named 'no_such_mod_x'"),
     ("no_such_mod_x.fn", ModuleNotFoundError, "No module named 'no_such_mod_x'"),
     ("os:no_such_attr", AttributeError, "no attribute 'no_such_attr'"),
     ("os.path.no_such_attr", AttributeError, "no attribute 'no_such_attr'")],
)  # fmt: skip
def test_errors_name_what_is_wrong(spec: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        import_object(spec)


def test_an_error_inside_the_named_module_is_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "debtpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "needs_dep.py").write_text("import no_such_dependency_x\ndef f(): pass\n")
    (pkg / "bad_value.py").write_text("raise ValueError('invalid format: from the module itself')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("debtpkg.needs_dep.f", "debtpkg.needs_dep:f"):
        with pytest.raises(ModuleNotFoundError, match="no_such_dependency_x"):
            import_object(spec)
    with pytest.raises(ValueError, match="from the module itself"):
        import_object("debtpkg.bad_value:f")


PRIVATE = ["os:_exit", "os._exit", "os.path:_get_sep", "_thread:start_new_thread", "collections.abc:Set._hash"]


@pytest.mark.parametrize("spec", [*PRIVATE, "builtins:__import__"])
def test_every_part_import_object_walks_is_one_is_private_checks(spec: str) -> None:
    """``import_object`` imports and walks the parts between ``.`` and ``:``, which are
    what ``is_private`` looks at: the import resolver never reaches a private name."""
    assert is_private(spec)
    assert ImportResolver().resolve(spec) is None
    assert import_object(spec) is not None  # reachable: only is_private stands in the way
