"""The one base of every error dualsearch raises on purpose.

A :class:`DualsearchError` means "what was asked for cannot be done, and here is why in one
line": a missing folder, a damaged catalog, an index built with another model, a bad option value.
The command line prints it as ``dualsearch: error: <message>`` and exits with status 2. Anything
else that escapes (a ``ValueError`` from a library, a ``KeyError``) is a bug: the command line
says so in one line and shows the traceback with ``-v``.

Each layer names its own subclasses next to the code that raises them (``DataError`` in
``data.readers``, ``ModelError`` in ``model``, ``CatalogError`` in ``index.catalog``, ...).
"""
from __future__ import annotations


class DualsearchError(Exception):
    """Base of every named dualsearch error; ``str()`` is one line for the user."""


class UsageError(DualsearchError):
    """Options that do not go together or values out of range (command line or Python API)."""


class ConfigError(DualsearchError):
    """A recipe, tower setting or engine name that does not exist."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a long step, after what could be kept was kept; ``str()`` is one line
    saying what (the command line prints ``dualsearch: interrupted: <message>`` and exits 130).
    A ``KeyboardInterrupt`` on purpose: ``except Exception`` never swallows it."""
