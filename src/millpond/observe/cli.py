"""The observability subcommands of ``millpond``: ``top``, ``size`` and ``advise``.

``millpond.cli`` adds them with :func:`add_arguments`; each sets ``func`` on its
parser, returning the exit status. Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

from typing import Any

from millpond.observe import advise, advisor, top


def add_arguments(subparsers: Any) -> None:
    """Add ``millpond top``, ``millpond size`` and ``millpond advise``."""
    top.add_arguments(subparsers)
    advisor.add_arguments(subparsers)
    advise.add_arguments(subparsers)
