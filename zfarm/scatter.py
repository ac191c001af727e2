"""Large inputs sent once: ``client.scatter(obj)`` and the handle that stands for ``obj`` in jobs.

::

    client: submit(fn, handle, i) ──pickling records the handle──► a bundle: fn + the handle's bytes,
            named by both (one function id for every job of fn with that handle)
    broker, worker: cache the bundle as they cache any function (mirrored FIFO caches): it crosses
            the network once per worker, not once per job
    slot:   unpickles the bundle once (fn and the object), then each job's handle unpickles as the object

A handle pickles as its key (16 bytes) wherever it is: an argument, inside a list, a dict or any
object. The bytes ride with the function because the function cache is already content-addressed
and mirrored on every hop; the broker never unpickles them.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack

from zfarm import serialization as ser
from zfarm.protocol import buffer_of

#: a bundle's first bytes (a plain function's pickle starts with b"\x80")
BUNDLE_MAGIC = b"ZFB1"

_local = threading.local()


class Scattered:
    """A handle for an object sent to workers once (see :meth:`zfarm.Client.scatter`).

    Pass it to jobs in place of the object, as an argument or inside one; in the job it is the
    object itself. It holds the object's pickled bytes in this process until it is dropped.
    """

    __slots__ = ("__weakref__", "frames", "key", "nbytes")

    def __init__(self, obj: Any) -> None:
        self.frames = [bytes(buffer_of(f)) if not isinstance(f, bytes) else f for f in ser.dumps(obj)]
        digest = hashlib.blake2b(digest_size=16)
        for frame in self.frames:
            digest.update(len(frame).to_bytes(8, "little"))
            digest.update(frame)
        self.key = digest.digest()
        self.nbytes = sum(len(f) for f in self.frames)

    def __reduce__(self) -> tuple[Any, ...]:
        used = getattr(_local, "used", None)
        if used is not None:  # pickled for a job: the job's function must carry our bytes
            used[self.key] = self
        return _lookup, (self.key,)

    def __repr__(self) -> str:
        return f"<zfarm.Scattered {self.key.hex()[:12]} {self.nbytes:,} bytes>"


@contextmanager
def collecting() -> Iterator[dict[bytes, Scattered]]:
    """Record the handles pickled in this thread meanwhile (a job's arguments)."""
    outer = getattr(_local, "used", None)
    _local.used = {}
    try:
        yield _local.used
    finally:
        _local.used = outer


def bundle(fn_id: bytes, fn_blob: bytes, handles: dict[bytes, Scattered]) -> tuple[bytes, bytes]:
    """One function blob holding ``fn`` and the handles' bytes, and its id (both names in one)."""
    keys = sorted(handles)
    head = msgpack.packb([len(fn_blob), [[key, [len(f) for f in handles[key].frames]] for key in keys]])
    parts = [BUNDLE_MAGIC, struct.pack("!I", len(head)), head, fn_blob]
    for key in keys:
        parts.extend(handles[key].frames)
    bundle_id = hashlib.blake2b(fn_id + b"".join(keys), digest_size=16).digest()
    return bundle_id, b"".join(parts)


class Bundled:
    """In a slot: a function and the objects its jobs' handles stand for."""

    __slots__ = ("fn", "objects")

    def __init__(self, fn: Any, objects: dict[bytes, Any]) -> None:
        self.fn = fn
        self.objects = objects


def load(blob: Any) -> Any:
    """A function blob as the slot needs it: the function, or a :class:`Bundled` one."""
    view = memoryview(buffer_of(blob))
    if view[:len(BUNDLE_MAGIC)] != BUNDLE_MAGIC:
        return ser.load_function(view)
    at = len(BUNDLE_MAGIC)
    (head_len,) = struct.unpack_from("!I", view, at)
    at += 4
    fn_len, entries = msgpack.unpackb(view[at:at + head_len])
    at += head_len
    fn = ser.load_function(view[at:at + fn_len])
    at += fn_len
    objects = {}
    for key, sizes in entries:
        frames = []
        for size in sizes:
            frames.append(view[at:at + size])
            at += size
        objects[key] = ser.loads(frames)
    return Bundled(fn, objects)


@contextmanager
def resolving(objects: dict[bytes, Any]) -> Iterator[None]:
    """While arguments are unpickled in a slot: handles become these objects."""
    _local.objects = objects
    try:
        yield
    finally:
        _local.objects = None


def _lookup(key: bytes) -> Any:
    objects = getattr(_local, "objects", None)
    if objects is None or key not in objects:
        raise LookupError(f"scattered object {key.hex()[:12]} is not here: a handle from client.scatter() "
                          "works only in the arguments of that client's jobs")
    return objects[key]
