"""A griffe extension for the API reference: Sphinx cross-reference roles in prefork's
docstrings (``:class:`Config```, ``:meth:`~Executor.map```) become links, and reST's
``text::`` before a literal block reads ``text:`` (the indented block is code in Markdown too).
An attrs field documented in its metadata (``attrs.field(..., metadata=doc("..."))`` or
``metadata={"doc": "..."}``), as prefork's config classes are, gets that text as its docstring,
and so does an attribute documented by a Sphinx ``#:`` comment (on its line, or the lines above).

Each role's target is resolved in the scope of the object whose docstring holds it, as
Python would resolve the name there.  A target in prefork becomes a link, which shows as
plain code when the target has no page on the site (a private helper); a target prefork
imports from elsewhere, or a name nothing defines outside prefork (``ResourceWarning``,
``concurrent.futures.Future``), is plain code.  A target that names prefork but does not
exist is left as a cross-reference that cannot be resolved, so ``mkdocs build --strict``
fails on it and names it.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|exc|data|obj):`(~?)\.?([\w.]+)(?:\(\))?`")
LITERAL = re.compile(r"(?<=\S)::(?=[ \t]*\n[ \t]*\n)")  # reST's "text::" before a literal block
FIELD_DOC = re.compile(r"""metadata=(?:doc\(|\{\s*['"]doc['"]\s*:\s*)('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")
LONE_LITERAL = re.compile(r"^[ \t]*::[ \t]*\n", re.MULTILINE)  # its "::" alone on a line


def _exists(collection: Any, path: str) -> bool:
    try:
        collection[path]
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return True


def _target(obj: griffe.Object, name: str) -> str | None:
    """The full path ``name`` stands for where ``obj`` is documented; ``None`` when not prefork's."""
    head, _, rest = name.partition(".")
    try:
        full = obj.resolve(head)
    except griffe.NameResolutionError:
        full = head
    full = f"{full}.{rest}" if rest else full
    return full if full == "prefork" or full.startswith("prefork.") else None


def _rewrite(obj: griffe.Object, text: str) -> str:
    def one(m: re.Match[str]) -> str:
        short, name = m.group(1) == "~", m.group(2)
        title = f"<code>{name.rsplit('.', 1)[-1] if short else name}</code>"
        full = _target(obj, name)
        if full is None:
            return title
        if not _exists(obj.modules_collection, full):
            return f"[{title}][{full}]"  # unresolvable on purpose: the strict build names it
        return f'<autoref identifier="{full}" optional>{title}</autoref>'

    return LONE_LITERAL.sub("", LITERAL.sub(":", ROLE.sub(one, text)))


def _comment_doc(obj: griffe.Object) -> str | None:
    """The ``#:`` comment of an attribute: after it on its line, or on the lines right above."""
    if obj.lineno is None or obj.filepath is None or isinstance(obj.filepath, list):
        return None
    try:
        lines = obj.lines_collection[obj.filepath]  # a LinesCollection has no .get
    except KeyError:
        return None
    if not 0 < obj.lineno <= len(lines):
        return None
    if m := re.search(r"#:\s*(.*)$", lines[obj.lineno - 1]):
        return m.group(1)
    above: list[str] = []
    n = obj.lineno - 2
    while n >= 0 and (m := re.match(r"\s*#:\s?(.*)$", lines[n])):
        above.insert(0, m.group(1))
        n -= 1
    return "\n".join(above) or None


def _walk(obj: griffe.Object) -> None:
    if obj.docstring is None and obj.is_attribute:
        if m := FIELD_DOC.search(str(getattr(obj, "value", ""))):
            text: str | None = ast.literal_eval(m.group(1))
        else:
            text = _comment_doc(obj)
        if text:  # plain text, not Markdown
            obj.docstring = griffe.Docstring(text.replace("&", "&amp;").replace("<", "&lt;"), parent=obj)
    if obj.docstring is not None:
        obj.docstring.value = _rewrite(obj, obj.docstring.value)
    for member in obj.members.values():
        if not member.is_alias and isinstance(member, griffe.Object):
            _walk(member)


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.path == "prefork":
            _walk(pkg)
