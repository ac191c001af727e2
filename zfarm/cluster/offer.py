"""What the workers a cluster launches offer jobs: resources and tags, as their ``--resources`` and
``--tags`` (docs/clusters.md).

A cluster takes them as Python values or as the worker's own text (``{"gpus": 1, "mem": "32G"}`` or
``"gpus=1,mem=32G"``; ``{"bigmem"}`` or ``"bigmem,avx512"``), checks them once, before anything
starts, and hands every worker it launches the same checked text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from zfarm.config import is_short_name, parse_amount, parse_resources, parse_tags
from zfarm.errors import ConfigError

#: a Slurm ``--mem``: a whole number with an optional unit (K, M, G, T); no unit means megabytes
_SLURM_MEM = re.compile(r"^(\d+)([KMGT]?)$", re.IGNORECASE)


def resources_text(resources: Mapping[str, Any] | str | None) -> str:
    """``resources`` as a worker's ``--resources`` text ("" for none), checked.

    Raises:
        ConfigError: a name that is not a short name, or an amount that is not a finite number of 0
            or more (for ``mem``, also a size such as ``"32G"``); the message names it.
    """
    if resources is None:
        return ""
    if isinstance(resources, str):
        parse_resources(resources)
        return ",".join(e.strip() for e in resources.split(",") if e.strip())
    if not isinstance(resources, Mapping):
        raise ConfigError(f'resources must be a mapping such as {{"gpus": 1, "mem": "32G"}} or a text '
                          f'such as "gpus=1,mem=32G", not {resources!r}')
    entries = [_entry(name, amount) for name, amount in resources.items()]
    text = ",".join(entries)
    parse_resources(text)  # what each worker will read: a text it refuses must not get this far
    return text


def _entry(name: Any, amount: Any) -> str:
    """``name=amount`` as a worker reads it back: a number in plain decimals (``1e-07`` would not parse;
    ``f"{x:f}"`` rounds 1e-7 to 0), the shortest that is the same float."""
    if not is_short_name(name):
        raise ConfigError(f"resource name {name!r}: a letter then up to 63 letters, digits, _ . -")
    if isinstance(amount, bool) or not isinstance(amount, (int, float, str)) or (
            isinstance(amount, float) and not math.isfinite(amount)):
        raise ConfigError(f"resource {name}={amount!r}: give a finite number of 0 or more"
                          f"{' or a size such as 512M or 4G' if name == 'mem' else ''}")
    parse_amount(name, amount)  # raises, naming the resource
    if isinstance(amount, str):
        return f"{name}={amount.strip()}"
    return f"{name}={Decimal(repr(amount)):f}" if isinstance(amount, float) else f"{name}={amount}"


def tags_text(tags: Iterable[str] | str | None) -> str:
    """``tags`` as a worker's ``--tags`` text ("" for none), checked.

    Raises:
        ConfigError: a tag that is not a short name (the message names it).
    """
    if tags is None:
        return ""
    if isinstance(tags, str):
        return ",".join(parse_tags(tags))
    if not isinstance(tags, Iterable) or isinstance(tags, Mapping):
        raise ConfigError(f'tags must be a list of names such as ["bigmem"] or a text such as '
                          f'"bigmem,avx512", not {tags!r}')
    listed = list(tags)
    bad = [t for t in listed if not is_short_name(t)]
    if bad:
        raise ConfigError(f"tags {', '.join(map(repr, bad))}: a tag is a letter then up to 63 letters, "
                          "digits, _ . -")
    return ",".join(sorted(set(listed)))


def offer_args(resources: str, tags: str) -> list[str]:
    """The worker's command-line flags for checked ``resources`` and ``tags`` texts."""
    return [*(["--resources", resources] if resources else []), *(["--tags", tags] if tags else [])]


def with_slurm_mem(resources: str, mem: str | None) -> str:
    """A Slurm worker offers the memory its job asked for (``--mem``), not its node's, unless
    ``resources`` says how much."""
    match = _SLURM_MEM.match(mem.strip()) if mem else None
    if match is None or int(match.group(1)) == 0 or "mem" in parse_resources(resources):
        return resources  # (--mem=0: all of the node's memory, which the worker finds itself)
    amount = f"mem={match.group(1)}{match.group(2).upper() or 'M'}"
    return f"{resources},{amount}" if resources else amount
