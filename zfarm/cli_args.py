"""Argument types, flags and output shared by the ``zfarm`` subcommands (cli.py, cli_batch.py,
cli_projects.py).

Every type's error names the value and what was expected; every flag's help names its default
and the ``ZFARM_*`` variable that also sets it.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from typing import Any

from zfarm.config import DEFAULT_ADDRESS, check_endpoint, parse_amount
from zfarm.errors import ConfigError


def command(sub: Any, name: str, text: str, run: Any) -> argparse.ArgumentParser:
    cmd: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
    cmd.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                     help="how much to log (default info)")
    cmd.add_argument("--log-json", action="store_true",
                     help="log one JSON object per line, for collectors (default: text)")
    cmd.set_defaults(run=run)
    return cmd


def connect_flag(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--connect", metavar="ENDPOINT",
                     help=f"the broker's endpoint (env ZFARM_ADDRESS; default {DEFAULT_ADDRESS})")


def broker_address(args: argparse.Namespace, fallback: str = "", listening: bool = False) -> str:
    """The broker a command talks to: --connect, else ``fallback`` (an array's own), else
    ZFARM_ADDRESS, else the default; checked here, before anything is kept or sent.
    ``listening``: also fail at once if nothing listens there (not after the command's timeout).

    Raises:
        ConfigError: not an endpoint a client or monitor can connect to.
        BrokerUnavailable: ``listening``, and the connection was refused.
    """
    address = str(args.connect or fallback or os.environ.get("ZFARM_ADDRESS") or DEFAULT_ADDRESS)
    check_endpoint(address)
    if listening:
        from zfarm.monitor import check_listening
        from zfarm.security import keys_root

        if keys := keys_folder(args):
            keys_root(keys)  # a missing keys folder is a usage error, said before any connection
        check_listening(address)
    return address


def keys_folder(args: argparse.Namespace, fallback: str = "") -> str:
    """The keys folder: --keys, else ``fallback`` (an array's own), else ZFARM_KEYS, else none ("")."""
    return str(args.keys or fallback or os.environ.get("ZFARM_KEYS", ""))


def print_columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Plain text columns, each as wide as its widest cell, nothing cut: for pipes and scripts."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(header)]
    for line in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def timeout_flag(cmd: argparse.ArgumentParser, default_s: float,
                  text: str = "seconds to wait for the broker") -> None:
    cmd.add_argument("--timeout", type=seconds, default=default_s, metavar="SECONDS",
                     help=f"{text} (default {default_s:g})")


def seconds(text: str) -> float:
    """argparse type: a positive, finite number of seconds (its message names the value)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def count(text: str) -> int:
    """argparse type: a whole number, 0 or more."""
    return whole(text, 0)


def some(text: str) -> int:
    """argparse type: a whole number, 1 or more."""
    return whole(text, 1)


def whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"expected a whole number, {least} or more, got {text!r}")
    return value


def keys_flag(cmd: argparse.ArgumentParser, name: bool = True) -> None:
    cmd.add_argument("--keys", metavar="FOLDER",
                     help="keys folder: CURVE authentication and encryption (env ZFARM_KEYS; default: none)")
    if name:
        cmd.add_argument("--key-name", help="which key of the folder's list to use (default: the only one)")


def size_bytes(text: str) -> int:
    """argparse type: a size in bytes above 0, written as a ``mem`` request is (500M, 3Mi, 2GiB, 1P)."""
    try:
        value = int(parse_amount("mem", text))
    except ConfigError:
        raise argparse.ArgumentTypeError(f"expected a size in bytes (as 500M or 2G), got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a size above 0 bytes, got {text!r}")
    return value
