"""The pluggy markers. Kept apart so strategy modules can import them early."""

from __future__ import annotations

from typing import Final

import pluggy

#: The project name pluggy uses for markers and the entry-point group.
NAME: Final = "prefork"

hookspec = pluggy.HookspecMarker(NAME)
#: Decorate plugin functions with this to implement a hook.
hookimpl = pluggy.HookimplMarker(NAME)
