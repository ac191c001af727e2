"""Functions, data and exceptions into frames and back: out-of-band buffers, cloudpickle, tracebacks."""

from __future__ import annotations

import pickle
import sys
from typing import Any

import pytest

from tests import jobs
from zfarm import serialization as ser
from zfarm.errors import JobError, RemoteTraceback

BIG = ser.OUT_OF_BAND_MIN_BYTES * 4


class Blob:
    """A memoryview-backed object that hands its buffer to pickle protocol 5 (as numpy arrays do)."""

    def __init__(self, data: Any) -> None:
        self.data = memoryview(data)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (Blob, (pickle.PickleBuffer(self.data),))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Blob) and bytes(self.data) == bytes(other.data)

    __hash__ = None  # type: ignore[assignment]


class FakeFrame:
    """Like zmq.Frame: the bytes are behind ``.buffer``."""

    def __init__(self, data: Any) -> None:
        self.buffer = memoryview(data)


def pattern(n: int) -> bytearray:
    return bytearray((i * 7) % 251 for i in range(n))


def test_small_objects_are_one_frame() -> None:
    for obj in (None, 3, "text", [1, 2, {"a": (3, 4)}], b"x" * 100, bytearray(1000)):
        frames = ser.dumps(obj)
        assert len(frames) == 1
        assert ser.loads(frames) == obj


def test_large_bytearray_travels_out_of_band_without_a_copy() -> None:
    data = pattern(BIG)
    frames = ser.dumps(data)
    assert len(frames) == 2
    assert len(frames[0]) < 1024  # the pickle itself stays small
    assert memoryview(frames[1]).nbytes == BIG
    assert memoryview(frames[1]).obj is data  # the frame is a view of the caller's buffer
    back = ser.loads([bytes(frames[0]), bytes(frames[1])])  # as received: plain bytes
    assert back == data and type(back) is bytearray


def test_memoryview_backed_objects_give_one_frame_per_large_buffer() -> None:
    obj = {"a": Blob(pattern(BIG)), "b": Blob(bytes(BIG)), "small": Blob(b"tiny"), "n": 5}
    frames = ser.dumps(obj)
    assert len(frames) == 3  # the pickle and the two large buffers; the tiny one stays in band
    assert ser.loads(frames) == obj
    assert ser.loads([FakeFrame(f) for f in frames]) == obj  # zmq.Frame-like frames work too


def test_numpy_arrays_travel_out_of_band() -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(BIG // 8, dtype=np.float64).reshape(-1, 8)
    frames = ser.dumps((array, "label"))
    assert len(frames) == 2
    back, label = ser.loads([bytes(f) for f in frames])
    assert label == "label" and back.dtype == array.dtype and back.shape == array.shape
    assert (back == array).all()


def test_lambdas_and_closures_fall_back_to_cloudpickle() -> None:
    offset = 10
    frames = ser.dumps({"f": lambda x: x + offset, "g": lambda: "g"})
    fns = ser.loads([bytes(f) for f in frames])
    assert fns["f"](5) == 15 and fns["g"]() == "g"


def test_cloudpickle_fallback_keeps_buffers_out_of_band() -> None:
    data = pattern(BIG)
    frames = ser.dumps([data, lambda: 1])  # pickle fails after it already saw the buffer
    assert len(frames) == 2
    back, fn = ser.loads(frames)
    assert back == data and fn() == 1


def test_call_and_chunk_frames() -> None:
    call = ser.loads(ser.dump_call((1, "a"), {"k": 2}))
    assert call == (ser.CALL, (1, "a"), {"k": 2})
    chunk = ser.loads(ser.dump_chunk([(1,), (2,)]))
    assert chunk == (ser.CHUNK, [(1,), (2,)], None)


# ---- functions -----------------------------------------------------------------------------------


def test_function_id_is_stable_and_distinct() -> None:
    fn_id, blob = ser.dump_function(jobs.square)
    assert (fn_id, blob) == ser.dump_function(jobs.square)
    assert isinstance(fn_id, bytes) and len(fn_id) == 16
    assert ser.dump_function(jobs.add)[0] != fn_id
    assert ser.load_function(blob)(7) == 49
    assert ser.load_function(FakeFrame(blob))(3) == 9


def test_function_by_value_has_a_stable_id() -> None:
    def triple(x: int) -> int:
        return 3 * x

    first, blob = ser.dump_function(triple)
    assert ser.dump_function(triple)[0] == first
    assert ser.load_function(blob)(4) == 12
    assert ser.dump_function(lambda x: 3 * x)[0] != first


# ---- exceptions ----------------------------------------------------------------------------------


def raise_and_dump(fn: Any, *args: Any, partial: list[Any] | None = None) -> list[Any]:
    try:
        fn(*args)
    except BaseException as exc:  # the point is to ship whatever was raised
        return ser.dump_exception(exc, partial)
    raise AssertionError("did not raise")


def test_exception_keeps_type_and_arguments_and_gets_the_remote_traceback() -> None:
    frames = raise_and_dump(jobs.boom, 4)
    exc, partial = ser.load_exception([bytes(f) for f in frames])
    assert type(exc) is ValueError
    assert exc.args == ("boom 4",)
    assert partial is None
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in boom" in cause.tb and "ValueError: boom 4" in cause.tb
    assert cause.tb in str(cause)


def test_custom_exception_keeps_its_attributes_and_partial_results() -> None:
    frames = raise_and_dump(jobs.raise_custom, 7, partial=[1, 4])
    exc, partial = ser.load_exception(frames)
    assert isinstance(exc, jobs.CustomError)
    assert (exc.code, exc.detail) == (7, "raised for 7")
    assert str(exc) == "custom error 7: raised for 7"
    assert partial == [1, 4]
    assert isinstance(exc.__cause__, RemoteTraceback) and "raise_custom" in exc.__cause__.tb


class Unrebuildable(Exception):
    """Pickles, but its constructor cannot be called again with ``args``."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}+{b}")


def raise_unrebuildable() -> None:
    raise Unrebuildable(1, 2)


def test_exception_that_cannot_be_rebuilt_comes_back_as_job_error_with_the_traceback() -> None:
    frames = raise_and_dump(raise_unrebuildable)
    exc, _partial = ser.load_exception(frames)
    assert isinstance(exc, JobError)
    assert exc.type_name.endswith("Unrebuildable")
    assert exc.message == "1+2"
    assert "raise_unrebuildable" in exc.remote_traceback
    assert "Unrebuildable: 1+2" in exc.remote_traceback
    assert isinstance(exc.__cause__, RemoteTraceback)


class OnlyOnTheWorker(Exception):
    """Stands for an exception class the worker can import and the caller cannot."""


def raise_worker_only() -> None:
    raise OnlyOnTheWorker("disk quota")


def test_exception_whose_class_is_missing_in_the_caller_keeps_the_traceback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    frames = raise_and_dump(raise_worker_only)
    monkeypatch.delattr(sys.modules[__name__], "OnlyOnTheWorker")  # the caller cannot import it
    exc, _partial = ser.load_exception(frames)
    assert isinstance(exc, JobError)
    assert "OnlyOnTheWorker" in str(exc)
    assert "raise_worker_only" in exc.remote_traceback, "the remote traceback was lost"
    assert "disk quota" in exc.remote_traceback


def test_exception_raised_by_a_lambda_job() -> None:
    frames = raise_and_dump(lambda: 1 / 0)
    exc, _partial = ser.load_exception(frames)
    assert type(exc) is ZeroDivisionError
    assert "ZeroDivisionError" in exc.__cause__.tb  # type: ignore[union-attr]


def test_error_line_names_the_type_and_first_line() -> None:
    assert ser.error_line(ValueError("bad\nsecond line")) == "ValueError: bad"
    assert ser.error_line(jobs.CustomError(1, "x")) == "tests.jobs.CustomError: custom error 1: x"
    assert ser.error_line(KeyError()) == "KeyError"


def test_a_bundle_carries_its_function_and_objects_and_handles_resolve_inside_containers() -> None:
    from zfarm import scatter

    big = scatter.Scattered(list(range(1000)))
    with scatter.collecting() as used:
        frames = ser.dump_call(({"deep": [big]},), {})
    assert list(used) == [big.key]
    fn_id, blob = ser.dump_function(len)
    bundle_id, bundle = scatter.bundle(fn_id, blob, used)
    assert bundle_id != fn_id and scatter.bundle(fn_id, blob, used)[0] == bundle_id  # named by both
    loaded = scatter.load(bundle)
    assert isinstance(loaded, scatter.Bundled) and loaded.fn is len
    with scatter.resolving(loaded.objects):
        _mode, args, _kwargs = ser.loads(frames)
    assert args[0]["deep"][0] == list(range(1000))
    with pytest.raises(LookupError, match="scatter"):
        ser.loads(frames)  # outside a job of its bundle, a handle is only a key
