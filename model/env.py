"""Boolean environment variables, read one way everywhere (ERNIE_*, FORCE_COLOR, NO_COLOR).

Unset or empty means the default; 0, false, no and off (any case) mean off; any other value means on.
"""

from __future__ import annotations

import os

OFF = ("0", "false", "no", "off")


def env_flag(name: str, default: bool = False) -> bool:
    """The boolean value of environment variable `name` (see the module docstring)."""
    value = env_flag_or_none(name)
    return default if value is None else value


def env_flag_or_none(name: str) -> bool | None:
    """Like env_flag, but None when the variable is unset or empty (so a caller can tell "not set" apart)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    return value not in OFF
