"""python -m largessl ... (same as the `largessl` command)."""

from largessl.cli import entry

entry()
