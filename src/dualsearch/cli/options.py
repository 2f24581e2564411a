"""The one place numeric command-line options are checked: argparse ``type=`` callables.

Each callable turns the option's text into a number or raises :class:`argparse.ArgumentTypeError`;
argparse then prints the usage line and ``argument -k: must be at least 1, got 0`` and exits with
status 2, before any command runs. Every command uses these for every numeric option.
"""
from __future__ import annotations

import argparse
import math

SEED_MAX = 2**32 - 1  # numpy's and Lightning's seed range


def _int(text: str) -> int:
    """An integer from ``text``; an integral float spelling ("1e6") is accepted too."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not math.isfinite(value) or not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(value)


def _float(text: str) -> float:
    """A finite float from ``text``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_at_least(low: int, high: int | None = None, name: str | None = None):
    """A ``type=`` callable: an integer in ``[low, high]`` (no upper bound when ``high`` is None).
    Raises :class:`argparse.ArgumentTypeError` for anything else."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {text}")
        return value

    parse.__name__ = name or f"int_at_least_{low}"
    return parse


positive_int = int_at_least(1, name="positive_int")
"""An integer >= 1 (counts, sizes, k)."""
non_negative_int = int_at_least(0, name="non_negative_int")
"""An integer >= 0 (worker processes, layers, records to show)."""
port = int_at_least(1, 65535, name="port")
"""A TCP port, 1..65535."""
seed = int_at_least(0, SEED_MAX, name="seed")
"""A random seed, 0..2**32-1."""
dimension = int_at_least(1, 65536, name="dimension")
"""An embedding width, 1..65,536."""
batch = int_at_least(1, 1 << 20, name="batch")
"""A batch size, 1..1,048,576."""


def devices(text: str) -> str | int:
    """Lightning's ``devices``: "auto" or a positive count."""
    if text == "auto":
        return text
    try:
        return int_at_least(1, 4096)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f'expected "auto" or a number of devices >= 1, got {text!r}') from None


def finite_float(text: str) -> float:
    """Any finite number (weights may be negative). Raises :class:`argparse.ArgumentTypeError`."""
    return _float(text)


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rate, temperature, GB). Raises :class:`argparse.ArgumentTypeError`."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (weight decay). Raises :class:`argparse.ArgumentTypeError`."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def cosine(text: str) -> float:
    """A cosine similarity threshold in (0, 1]. Raises :class:`argparse.ArgumentTypeError`."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a cosine in (0, 1], got {text}")
    return value


def fraction(text: str) -> float:
    """A probability in [0, 1) (a held-out fraction). Raises :class:`argparse.ArgumentTypeError`."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def iso_date(text: str) -> str:
    """An ISO 8601 date (``2024-05-01``) or date-time (``2024-05-01T18:30:00``), returned as given."""
    from datetime import date, datetime

    try:
        (date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS): {text}") from None
    return text
