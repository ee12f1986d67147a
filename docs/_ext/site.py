"""mkdocs hooks: the repository's README.md is the site's home page, and links to files
outside docs/ keep working.

The Markdown pages link as they read on a forge: README.md links ``docs/plugins.md``, a
page under docs/ links ``../examples/primes.py``.  On the site the home page is built from
README.md (its ``docs/...`` links made relative to the site), and each file outside docs/
that a page links to is published under ``repo/`` (a file as is; a directory as its
README.md, rendered as a page), the link rewritten to it.  A link to a path that does not
exist is left alone, so ``mkdocs build --strict`` reports it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files, InclusionLevel

LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?(\))")
FENCE = re.compile(r"^\s*(```|~~~)")
MIRROR = "repo"

_sources: dict[str, Path] = {}  # site page (src_uri) -> the Markdown file in the repository it is built from


def _root(config: Any) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def _links(text: str) -> list[str]:
    """The relative link targets of a Markdown text, outside fenced code blocks."""
    found: list[str] = []
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            found += [m.group(2) for m in LINK.finditer(line) if not re.match(r"^[a-z][a-z0-9+.-]*:", m.group(2))]
    return found


def on_files(files: Files, config: Any) -> Files:
    root, docs = _root(config), Path(config["docs_dir"]).resolve()
    _sources.clear()
    for file in files.documentation_pages():
        _sources[file.src_uri] = docs / file.src_uri
    readme = root / "README.md"
    files.append(File.generated(config, "index.md", abs_src_path=str(readme)))
    _sources["index.md"] = readme
    todo = list(_sources.items())
    while todo:
        _, source = todo.pop()
        for target in _links(source.read_text(encoding="utf-8")):
            path = (source.parent / target).resolve()
            if not path.exists() or path.is_relative_to(docs) or not path.is_relative_to(root):
                continue
            if path.is_dir():
                path = path / "README.md"
                if not path.is_file():
                    continue
            uri = f"{MIRROR}/{path.relative_to(root).as_posix()}"
            if files.get_file_from_path(uri) is None:
                inclusion = InclusionLevel.NOT_IN_NAV if uri.endswith(".md") else InclusionLevel.UNDEFINED
                files.append(File.generated(config, uri, abs_src_path=str(path), inclusion=inclusion))
                if uri.endswith(".md"):
                    _sources[uri] = path
                    todo.append((uri, path))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Each relative link that leaves docs/ points at the published copy; the others are as written."""
    source = _sources.get(page.file.src_uri)
    if source is None:
        return markdown
    root, docs = _root(config), Path(config["docs_dir"]).resolve()
    here = posixpath.dirname(page.file.src_uri)

    def rewrite(m: re.Match[str]) -> str:
        target = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            return m.group(0)
        path = (source.parent / target).resolve()
        if not path.exists() or not path.is_relative_to(root):
            return m.group(0)
        if path.is_relative_to(docs):
            uri = path.relative_to(docs).as_posix()
        else:
            if path.is_dir():
                path = path / "README.md"
            uri = f"{MIRROR}/{path.relative_to(root).as_posix()}"
        new = posixpath.relpath(uri, here or ".")
        return f"{m.group(1)}{new}{m.group(3) or ''}{m.group(4)}"

    out: list[str] = []
    fenced = False
    for line in markdown.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
        out.append(line if fenced else LINK.sub(rewrite, line))
    return "\n".join(out)
