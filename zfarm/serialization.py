"""Turning functions, arguments, results and exceptions into frames and back.

Functions travel once per client and worker (identified by a hash of their
pickle), by reference when importable and by value (cloudpickle) otherwise.
Data uses pickle protocol 5: large buffers (numpy arrays, bytearrays) become
their own frames, sent and received without copies. Only clients and workers
call into this module; the broker routes the frames without reading them.
"""

from __future__ import annotations

import hashlib
import linecache
import os
import pickle
import re
import traceback
import types
from collections.abc import Sequence
from typing import Any

import cloudpickle
import msgpack

from zfarm.errors import JobError, RemoteTraceback
from zfarm.protocol import buffer_of

#: buffers smaller than this stay inside the pickle: a frame costs more than a copy
OUT_OF_BAND_MIN_BYTES = 64 * 1024


def dump_function(fn: Any) -> tuple[bytes, bytes]:
    """Pickle a function; return ``(fn_id, blob)`` where fn_id names the blob.

    An importable function pickles by reference with the standard pickler, ten times
    faster than cloudpickle; anything that refers to ``__main__`` or cannot be imported
    (lambdas, closures, local functions) goes by value through cloudpickle, since a
    worker's ``__main__`` is not the caller's.
    """
    plain = type(fn) in _PLAIN_FUNCTIONS
    if plain and (known := _BY_REFERENCE.get(fn)) is not None:
        return known
    try:
        blob = pickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError):
        blob = b""
    if not blob or b"__main__" in blob:
        blob = cloudpickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
        _remember_sources(fn)
        return hashlib.blake2b(blob, digest_size=16).digest(), blob
    made = hashlib.blake2b(blob, digest_size=16).digest(), blob
    if plain:  # by reference (module and name): the same bytes every time
        if len(_BY_REFERENCE) >= FUNCTIONS_KEPT:
            try:
                _BY_REFERENCE.pop(next(iter(_BY_REFERENCE)))
            except (RuntimeError, StopIteration, KeyError):
                pass  # another thread made room meanwhile
        _BY_REFERENCE[fn] = made
    return made


#: plain functions pickled by reference, by function: ``submit`` in a loop pickles one once
_PLAIN_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType)
_BY_REFERENCE: dict[Any, tuple[bytes, bytes]] = {}
FUNCTIONS_KEPT = 256


#: where functions sent by value were defined, by code name: cloudpickle calls their file
#: "<dynamic-code>" on the worker, so the caller puts file names and source lines back
_SOURCES: dict[str, list[str]] = {}
SOURCES_KEPT = 10_000
#: the code of functions whose sources are noted, by id
_NOTED: dict[int, types.CodeType] = {}
_DYNAMIC_FRAME = re.compile(r'^(  File )"<dynamic-code>", line (\d+), in (.+)$', re.MULTILINE)


def _remember_sources(fn: Any) -> None:
    """Note the files of ``fn``'s code, of code nested in it and of the functions it names; once per
    code object (``submit`` in a loop sends one function by value again and again)."""
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):
        if _NOTED.get(id(code)) is code:
            return
        if len(_NOTED) < SOURCES_KEPT:
            _NOTED[id(code)] = code  # kept alive, so its id names no other code meanwhile
    todo = [fn]
    seen: set[int] = set()
    while todo and len(seen) < 200:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        code = getattr(obj, "__code__", None) if not isinstance(obj, types.CodeType) else obj
        if not isinstance(code, types.CodeType):
            continue
        if not code.co_filename.startswith("<"):
            files = _SOURCES.setdefault(code.co_name, [])
            if code.co_filename not in files and len(_SOURCES) < SOURCES_KEPT:
                files.append(code.co_filename)
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        names = getattr(obj, "__globals__", {})
        todo.extend(f for name in code.co_names if isinstance(f := names.get(name), types.FunctionType))


def _restore_sources(tb: str) -> str:
    """Give frames of functions sent by value their file name and source line back."""

    def frame(match: re.Match[str]) -> str:
        line, name = int(match.group(2)), match.group(3)
        found = [(filename, source) for filename in _SOURCES.get(name.rsplit(".", 1)[-1], [])
                 if (source := linecache.getline(filename, line).strip())]
        if len(found) != 1:  # unknown, or two files could hold it: say nothing rather than guess
            return match.group(0)
        filename, source = found[0]
        return f'{match.group(1)}"{filename}", line {line}, in {name}\n    {source}'

    return _DYNAMIC_FRAME.sub(frame, tb) if "<dynamic-code>" in tb else tb


def load_function(blob: Any) -> Any:
    return pickle.loads(buffer_of(blob))


class _Big:
    """Stands in for a large bytes/bytearray so that pickle sends it out of band.

    The C pickler writes bytes and bytearrays inline whatever their size and
    offers no hook for them, so large ones near the top of the object (the
    value itself, or an argument) are boxed before pickling.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return type(self.data), (pickle.PickleBuffer(self.data),)


#: types that hold no bytes to box (most arguments): returned as they are, at once
_ATOMS = frozenset({int, float, str, bool, type(None), complex})


def _box(obj: Any, depth: int = 3) -> Any:
    kind = type(obj)
    if kind in _ATOMS:
        return obj
    if kind is bytes or kind is bytearray:
        return _Big(obj) if len(obj) >= OUT_OF_BAND_MIN_BYTES else obj
    if depth and (kind is tuple or kind is list):
        return kind([_box(item, depth - 1) for item in obj])
    if depth and kind is dict:
        return {key: _box(value, depth - 1) for key, value in obj.items()}
    return obj


def dumps(obj: Any) -> list[Any]:
    """Pickle ``obj`` into frames: the pickle, then its out-of-band buffers."""
    buffers: list[Any] = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        view = buf.raw()
        if view.nbytes < OUT_OF_BAND_MIN_BYTES:
            return True  # in band
        buffers.append(view)
        return False

    boxed = _box(obj)
    try:
        head = pickle.dumps(boxed, protocol=5, buffer_callback=keep)
    except (pickle.PicklingError, AttributeError, TypeError):
        # lambdas, closures and classes defined in __main__ need cloudpickle
        buffers.clear()
        head = cloudpickle.dumps(boxed, protocol=5, buffer_callback=keep)
    return [head, *buffers]


def loads(frames: Sequence[Any]) -> Any:
    return pickle.loads(buffer_of(frames[0]), buffers=[buffer_of(f) for f in frames[1:]])


class Upstream:
    """Another job's result in a job's arguments: pickled as a reference that the slot running the
    job resolves to that result, which the broker routes to it (option ``after``)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return (upstream_value, (self.index,))


#: the results of the job being unpickled now, by ``Upstream.index`` (set by the slot)
upstream_values: list[Any] = []


def upstream_value(index: int) -> Any:
    if index >= len(upstream_values):
        raise LookupError(f"upstream result {index} was not sent with this job")
    return upstream_values[index]


def dump_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """Frames for one call ``fn(*args, **kwargs)``."""
    return dumps((CALL, args, kwargs))


def dump_chunk(items: list[tuple[Any, ...]]) -> list[Any]:
    """Frames for a chunk of a map: ``[fn(*item) for item in items]`` in one job."""
    return dumps((CHUNK, items, None))


CALL, CHUNK = 0, 1


def dump_exception(exc: BaseException, partial: list[Any] | None = None) -> list[Any]:
    """Frames for a job's exception, ready to re-raise in the caller.

    Frame 0 names the exception in plain msgpack (type, message, traceback text), so
    the caller can say what happened even when it cannot unpickle the exception
    itself; then come the pickled exception and ``partial``, the results a chunk
    produced before its failing item.
    """
    tb = user_traceback(exc)
    try:
        pickled = dumps((exc, partial))
        loads(pickled)  # an exception that pickles but cannot be rebuilt is no use to the caller
    except Exception:
        pickled = dumps((JobError(_type_name(exc), str(exc), tb), partial))
    return [msgpack.packb([_type_name(exc), str(exc), tb]), *pickled]


def load_exception(frames: Sequence[Any]) -> tuple[BaseException, list[Any] | None]:
    """Rebuild a job's exception with the remote traceback as its ``__cause__``.

    Returns the exception and the partial results of a chunk (None for a call).
    Exceptions whose class cannot be imported here come back as :class:`JobError`.
    """
    type_name, message, tb = msgpack.unpackb(buffer_of(frames[0]))
    try:
        exc, partial = loads(frames[1:])
    except Exception as problem:
        note = f"{message} (the exception could not be rebuilt here: {problem!r})"
        return JobError(type_name, note, _restore_sources(tb)), None
    if not isinstance(exc, BaseException):
        return JobError(type_name, message, _restore_sources(tb)), partial
    if "Traceback" in tb:
        exc.__cause__ = RemoteTraceback(_restore_sources(tb))
    return exc, partial


_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_traceback(exc: BaseException) -> str:
    """The traceback of a job's exception as printed, without zfarm's own frames (the slot's)."""
    summary = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    todo, seen = [summary], set()
    while todo:
        part = todo.pop()
        if id(part) in seen:
            continue
        seen.add(id(part))
        part.stack = traceback.StackSummary.from_list(
            [frame for frame in part.stack if not frame.filename.startswith(_OWN_DIR)])
        todo.extend(chained for chained in (part.__cause__, part.__context__) if chained is not None)
    return "".join(summary.format())


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def error_line(exc: BaseException) -> str:
    """One line naming an exception, for logs and the broker's statistics."""
    text = str(exc).strip().splitlines()
    return f"{_type_name(exc)}: {text[0]}"[:200] if text else _type_name(exc)
