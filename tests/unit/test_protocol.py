"""Wire protocol: every message round-trips, and ``decode`` rejects bad input with ProtocolError only."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zfarm import protocol as p
from zfarm.errors import FieldTooLarge, ProtocolError

FN_ID = b"\x01" * 16

#: one instance of every message type, payload frames where the type carries them
SAMPLES: list[p.Message] = [
    p.Hello("worker", "w-1", "node7", 4242, 8, {"prefetch": 1, "gpu": ["a100"]}),
    p.Hello("client", "c-1", "laptop", 17),
    p.Welcome("b-1", 0.25, 4, 1 << 30, {"version": "0.1.0"}),
    p.Welcome("b-2", 2, 3, 100),
    p.Refused("protocol version 9"),
    p.Reconnect("broker restarted"),
    p.Heartbeat(),
    p.Disconnect("bye"),
    p.Disconnect(),
    p.Ready(3),
    p.Jobs([FN_ID], [["c-1", 0, 1, FN_ID, 2, {}], ["c-1", 1, 2, FN_ID, 0, {"timeout_s": 5}]],
           [b"fn-blob", b"arg0", b"arg0-buffer"]),
    p.Jobs([], [], []),
    p.Results(2, [["c-1", 0, 1, int(p.Outcome.OK), 1, ""], ["c-1", 1, 1, int(p.Outcome.LOST), 0, "why"]],
              [b"result0"]),
    p.CancelJobs([["c-1", 0], ["c-2", 7]]),
    p.Submit(FN_ID, True, [[0, 1, {}], [1, 2, {"k": "v"}], [2, 0, {}]], [b"fn", b"a", b"b1", b"b2"]),
    p.Submit(FN_ID, False, [[5, 1, {}]], [b"a"]),
    p.Result([[0, int(p.Outcome.OK), 2, "", 0], [1, int(p.Outcome.ERROR), 1, "ValueError: x", 0]],
             [b"r0", b"r0-buffer", b"e1"]),
    p.Cancel([1, 2, 3]),
    p.Status(),
    p.StatusReply({"queued": 3, "workers": [{"id": "w-1", "busy": 2}]}),
    p.Results(1, [["c-1", 0, 1, int(p.Outcome.OK), 1, ""]], [b"r"], [[1.5, 2.5, 1.0, 4096]]),
    p.Result([[0, int(p.Outcome.OK), 1, "", 0]], [b"r"], [["w-1", "h", 1, 1.0, 1.5, 2.5, 1.0, 4096]]),
    p.History(10),
    p.HistoryReply(["id", "run_s"], [["c-1:0", 0.5]]),
    p.Received([4, 5], 3),
    p.Accepted([1]),
    p.Started([["c-1", 3], ["c-2", 4]]),
    p.Reclaim([["c-1", 5]]),
    p.Running([3]),
    p.Results(1, [["c-1", 0, 1, int(p.Outcome.ERROR), 1, "JobTimeout"]], [b"e"], [], [p.ResultKind.LIMIT]),
    p.Project("suspend", "nightly", {}),
    p.Project("set", "nightly", {"priority": 5, "share": 2.0}),
    p.ProjectReply([{"name": "nightly", "state": "suspended"}], ""),
    p.Notice(int(p.NoticeKind.UNSCHEDULABLE), [3, 4], "it asks for gpus=2"),
    p.ClusterReport("slurm-3f2a1c", "lab", "slurm", 4, 3, 2, 1, 1, 0, 0, [0, 8], 2.0),
    p.ClusterReport("local-1", "", "local", 0, 0, 0, 0, 0, 0, 0, [], 2, True),
    p.Peek("s-array-x", 3, [1024, -1], 7, b"\x00route"),
    p.PeekReply("s-array-x", 3, 7, int(p.PeekStatus.RUNNING), [1024, -1], [2048, -1], [12, 0], b"",
                [b"more output\n", b""]),
]


def test_results_kinds_are_one_known_kind_per_row_or_none() -> None:
    row = ["c-1", 0, 1, int(p.Outcome.ERROR), 0, ""]
    for kinds in ([0, 0], [99]):
        with pytest.raises(ProtocolError, match="kinds"):
            p.decode(p.encode(p.Results(1, [row], [], [], kinds)))


def test_results_kinds_that_are_not_numbers_are_refused() -> None:
    """(A list or a map among the kinds used to raise TypeError out of decode: any peer could stop
    the broker with one message.)"""
    row = ["c-1", 0, 1, int(p.Outcome.ERROR), 0, ""]
    for kinds in ([[]], [{}], [1.0], [True]):
        envelope = msgpack.packb([1, [row], [], kinds], use_bin_type=True)
        with pytest.raises(ProtocolError, match="kinds"):
            p.decode([p.HEADER, bytes([p.Command.RESULTS]), envelope])


def test_an_error_a_check_misses_is_still_a_protocol_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: whatever a peer's bytes make a check raise, decode raises ProtocolError (which
    every reader drops as malformed), never an error that would end the process."""
    def broken(_msg: Any, _nframes: int) -> None:
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setitem(p._FRAME_RULES, p.Results, broken)
    with pytest.raises(ProtocolError, match="TypeError: unhashable"):
        p.decode(p.encode(p.Results(1, [["c-1", 0, 1, int(p.Outcome.OK), 0, ""]], [])))


def test_every_message_type_is_sampled() -> None:
    assert {type(m) for m in SAMPLES} == set(p.MESSAGE_TYPES.values())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: p.Message) -> None:
    frames = p.encode(msg)
    assert frames[0] == p.HEADER == b"ZF\x05"
    assert frames[1] == bytes([msg.command])
    decoded = p.decode(frames)
    assert type(decoded) is type(msg)
    assert decoded == msg


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_a_wrong_type_in_any_envelope_field_is_refused(msg: p.Message) -> None:
    """Each field replaced by a value of no type its schema allows (a bool where a number goes too):
    refused, whichever way ``decode`` reads the envelope."""
    header, cmd, env, *payload = p.encode(msg)
    envelope = msgpack.unpackb(env, raw=False)
    for position, kind in enumerate(type(msg).schema):
        allowed = kind if isinstance(kind, tuple) else (kind,)
        wrong = next(v for v in (True, None, 1.5, "x", [], {}) if type(v) not in allowed)
        changed = [*envelope[:position], wrong, *envelope[position + 1:]]
        with pytest.raises(ProtocolError, match="wrong type"):
            p.decode([header, cmd, msgpack.packb(changed, use_bin_type=True), *payload])


def test_a_number_field_takes_an_int_or_a_float() -> None:
    for interval in (2, 2.5):
        assert p.decode(p.encode(p.Welcome("b", interval, 3, 100))) == p.Welcome("b", interval, 3, 100)


@pytest.mark.parametrize("msg", [m for m in SAMPLES if hasattr(m, "frames")], ids=lambda m: type(m).__name__)
def test_payload_frames_pass_through_untouched(msg: Any) -> None:
    """The decoder routes payload frames as they are: the very same objects, never copies."""
    frames = p.encode(msg)
    decoded: Any = p.decode(frames)
    assert len(decoded.frames) == len(msg.frames)
    assert all(a is b for a, b in zip(decoded.frames, frames[3:], strict=True))


def test_decode_accepts_memoryviews_and_frame_like_objects() -> None:
    class FakeFrame:  # zmq.Frame exposes its bytes as .buffer
        def __init__(self, data: bytes) -> None:
            self.buffer = memoryview(data)

    msg = p.Result([[3, 0, 1, "", 0]], [b"payload"])
    header, cmd, env, payload = p.encode(msg)
    decoded = p.decode([memoryview(header), FakeFrame(cmd), memoryview(env), payload])
    assert decoded == msg


def frames_of(command: p.Command, envelope: Any, *payload: bytes) -> list[bytes]:
    return [p.HEADER, bytes([command]), msgpack.packb(envelope, use_bin_type=True), *payload]


BAD_FRAMES = {
    "no frames": [],
    "one frame": [p.HEADER],
    "two frames": [p.HEADER, bytes([p.Command.HEARTBEAT])],
    "bad magic": [b"XX\x01", bytes([p.Command.HEARTBEAT]), msgpack.packb([])],
    "long header": [b"ZF\x01\x00", bytes([p.Command.HEARTBEAT]), msgpack.packb([])],
    "empty header": [b"", bytes([p.Command.HEARTBEAT]), msgpack.packb([])],
    "unknown command": [p.HEADER, b"\x63", msgpack.packb([])],
    "command zero": [p.HEADER, b"\x00", msgpack.packb([])],
    "empty command": [p.HEADER, b"", msgpack.packb([])],
    "two command bytes": [p.HEADER, b"\x05\x05", msgpack.packb([])],
    "not msgpack": [p.HEADER, bytes([p.Command.READY]), b"\xc1"],
    "truncated msgpack": [p.HEADER, bytes([p.Command.READY]), b"\x92\x01"],
    "trailing msgpack": [p.HEADER, bytes([p.Command.READY]), msgpack.packb([1]) + msgpack.packb([1])],
    "empty envelope": [p.HEADER, bytes([p.Command.READY]), b""],
    "bad utf-8": [p.HEADER, bytes([p.Command.REFUSED]), b"\x91\xa2\xff\xfe"],
    "int map key": frames_of(p.Command.STATUS_REPLY, [{1: 2}]),
    "envelope not an array": frames_of(p.Command.READY, {"credit": 1}),
    "envelope a scalar": frames_of(p.Command.READY, 3),
    "too few fields": frames_of(p.Command.READY, []),
    "too many fields": frames_of(p.Command.READY, [1, 2]),
    "heartbeat with a field": frames_of(p.Command.HEARTBEAT, [1]),
    "hello missing info": frames_of(p.Command.HELLO, ["worker", "w", "h", 1, 1]),
    "credit a string": frames_of(p.Command.READY, ["3"]),
    "credit a float": frames_of(p.Command.READY, [3.0]),
    "credit a bool": frames_of(p.Command.READY, [True]),
    "pid a bool": frames_of(p.Command.HELLO, ["worker", "w", "h", True, 1, {}]),
    "slots None": frames_of(p.Command.HELLO, ["worker", "w", "h", 1, None, {}]),
    "role as bytes": frames_of(p.Command.HELLO, [b"worker", "w", "h", 1, 1, {}]),
    "interval a bool": frames_of(p.Command.WELCOME, ["b", True, 3, 10, {}]),
    "liveness a float": frames_of(p.Command.WELCOME, ["b", 1.0, 3.0, 10, {}]),
    "with_fn an int": frames_of(p.Command.SUBMIT, [FN_ID, 1, []], b"fn"),
    "fn_id a str": frames_of(p.Command.SUBMIT, ["f", False, []]),
    "jobs not a list": frames_of(p.Command.SUBMIT, [FN_ID, False, {}]),
    "results credit a bool": frames_of(p.Command.RESULTS, [False, []]),
    "status reply a list": frames_of(p.Command.STATUS_REPLY, [[1]]),
    "payload on heartbeat": frames_of(p.Command.HEARTBEAT, [], b"extra"),
    "payload on ready": frames_of(p.Command.READY, [1], b"extra"),
    # rows of the wrong shape
    "submit row short": frames_of(p.Command.SUBMIT, [FN_ID, False, [[0, 1]]], b"a"),
    "submit row long": frames_of(p.Command.SUBMIT, [FN_ID, False, [[0, 1, {}, 9]]], b"a"),
    "submit row not a list": frames_of(p.Command.SUBMIT, [FN_ID, False, [7]]),
    "submit seq a str": frames_of(p.Command.SUBMIT, [FN_ID, False, [["0", 1, {}]]], b"a"),
    "submit seq a bool": frames_of(p.Command.SUBMIT, [FN_ID, False, [[True, 1, {}]]], b"a"),
    "submit options a list": frames_of(p.Command.SUBMIT, [FN_ID, False, [[0, 1, []]]], b"a"),
    "jobs row short": frames_of(p.Command.JOBS, [[], [["c", 0, 1, FN_ID, 0]]]),
    "jobs fn_id a str": frames_of(p.Command.JOBS, [[], [["c", 0, 1, "f", 0, {}]]]),
    "jobs fns not bytes": frames_of(p.Command.JOBS, [["f"], []], b"fn"),
    "results row short": frames_of(p.Command.RESULTS, [1, [["c", 0, 1, 0, 0]]]),
    "results info None": frames_of(p.Command.RESULTS, [1, [["c", 0, 1, 0, 0, None]]]),
    "results outcome a bool": frames_of(p.Command.RESULTS, [1, [["c", 0, 1, False, 0, ""]]]),
    "result row a dict": frames_of(p.Command.RESULT, [[{"seq": 1}]]),
    "result seq a float": frames_of(p.Command.RESULT, [[[1.0, 0, 0, ""]]]),
    "cancel jobs key short": frames_of(p.Command.CANCEL_JOBS, [[["c"]]]),
    "cancel jobs seq a str": frames_of(p.Command.CANCEL_JOBS, [[["c", "1"]]]),
    "cancel seqs strings": frames_of(p.Command.CANCEL, [["1"]]),
    "cancel seqs bools": frames_of(p.Command.CANCEL, [[True]]),
    # frame counts that do not match the payload
    "result too few frames": frames_of(p.Command.RESULT, [[[0, 0, 2, ""]]], b"only-one"),
    "result too many frames": frames_of(p.Command.RESULT, [[[0, 0, 1, ""]]], b"a", b"b"),
    "submit fn frame missing": frames_of(p.Command.SUBMIT, [FN_ID, True, [[0, 1, {}]]], b"a"),
    "submit with_fn and nothing": frames_of(p.Command.SUBMIT, [FN_ID, True, []]),
    "jobs fn frame missing": frames_of(p.Command.JOBS, [[FN_ID], [["c", 0, 1, FN_ID, 1, {}]]], b"a"),
    "results frames missing": frames_of(p.Command.RESULTS, [1, [["c", 0, 1, 0, 1, ""]]]),
    # negative frame counts, alone and balanced by another row
    "result negative count": frames_of(p.Command.RESULT, [[[0, 0, -1, ""]]]),
    "result negative balanced": frames_of(p.Command.RESULT, [[[0, 0, -1, ""], [1, 0, 1, ""]]]),
    "submit negative balanced": frames_of(p.Command.SUBMIT, [FN_ID, False, [[0, -1, {}], [1, 2, {}]]], b"x"),
    "jobs negative count": frames_of(p.Command.JOBS, [[FN_ID], [["c", 0, 1, FN_ID, -1, {}]]]),
    "results negative count": frames_of(p.Command.RESULTS,
                                        [0, [["c", 0, 1, 0, -1, ""], ["c", 1, 1, 0, 1, ""]]]),
}


@pytest.mark.parametrize("frames", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_decode_rejects_bad_input_with_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError) as info:
        p.decode(frames)
    assert str(info.value)  # every rejection says why
    assert not isinstance(info.value, p.VersionMismatch)


def test_envelope_over_the_limit_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(p, "MAX_ENVELOPE_BYTES", 64)
    frames = frames_of(p.Command.REFUSED, ["x" * 100])
    with pytest.raises(ProtocolError, match="over the limit"):
        p.decode(frames)


def test_other_protocol_version_is_a_version_mismatch() -> None:
    frames = [b"ZF\x09", *p.encode(p.Hello("client", "c", "h", 1))[1:]]
    with pytest.raises(p.VersionMismatch) as info:
        p.decode(frames)
    exc = info.value
    assert isinstance(exc, ProtocolError)
    assert exc.version == 9
    text = str(exc)
    assert "version 9" in text
    assert f"speaks {p.PROTOCOL_VERSION}" in text


def test_version_mismatch_is_detected_before_the_rest_is_read() -> None:
    """A future version may change commands and envelopes: the header alone decides."""
    with pytest.raises(p.VersionMismatch):
        p.decode([b"ZF\xff", b"\xee", b"\xc1"])


def test_split_frames() -> None:
    assert p.split_frames([b"a", b"b", b"c"], [1, 0, 2]) == [[b"a"], [], [b"b", b"c"]]
    assert p.split_frames([], []) == []


# ---- property tests ------------------------------------------------------------------------------

PROPERTY = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

msgpackable = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True) | st.text(max_size=8) | st.binary(max_size=8),
    lambda kids: st.lists(kids, max_size=6) | st.dictionaries(st.text(max_size=4), kids, max_size=4),
    max_leaves=20,
)

binary_frames = st.lists(st.binary(max_size=24), min_size=0, max_size=6)


def _only_protocol_errors(frames: list[Any]) -> None:
    try:
        msg = p.decode(frames)
    except ProtocolError:
        return
    # whatever decodes is a well-formed message that encodes and decodes again
    assert type(msg) in p.MESSAGE_TYPES.values()
    assert type(p.decode(p.encode(msg))) is type(msg)


@PROPERTY
@given(binary_frames)
def test_random_frames_raise_only_protocol_error(frames: list[bytes]) -> None:
    _only_protocol_errors(frames)


@PROPERTY
@given(
    command=st.integers(min_value=0, max_value=255),
    envelope=msgpackable,
    payload=st.lists(st.binary(max_size=8), max_size=3),
)
def test_structured_frames_raise_only_protocol_error(command: int, envelope: Any,
                                                     payload: list[bytes]) -> None:
    frames = [p.HEADER, bytes([command]), msgpack.packb(envelope, use_bin_type=True), *payload]
    _only_protocol_errors(frames)


def _row(layout: tuple[type, ...]) -> st.SearchStrategy[list[Any]]:
    """Rows that mostly fit the layout, sometimes not (any field may be any msgpack value)."""
    typed = {str: st.text(max_size=4), int: st.integers(-3, 3), bytes: st.binary(max_size=4),
             dict: st.dictionaries(st.text(max_size=3), msgpackable, max_size=2)}
    fields = [typed[kind] | msgpackable if kind in typed else msgpackable for kind in layout]
    return st.tuples(*fields).map(list) | st.lists(msgpackable, max_size=len(layout) + 1)


near_valid_envelopes = st.one_of(
    st.tuples(st.just(p.Command.SUBMIT), st.tuples(st.binary(max_size=4), st.booleans() | msgpackable,
                                                    st.lists(_row(p.SUBMIT_ROW), max_size=3)).map(list)),
    st.tuples(st.just(p.Command.JOBS), st.tuples(st.lists(st.binary(max_size=4) | msgpackable, max_size=2),
                                                  st.lists(_row(p.JOB_ROW), max_size=3)).map(list)),
    st.tuples(st.just(p.Command.RESULTS), st.tuples(st.integers(-2, 2) | msgpackable,
                                                     st.lists(_row(p.RESULTS_ROW), max_size=3)).map(list)),
    st.tuples(st.just(p.Command.RESULT), st.tuples(st.lists(_row(p.RESULT_ROW), max_size=3)).map(list)),
    st.tuples(st.just(p.Command.CANCEL_JOBS), st.tuples(st.lists(_row(p.KEY_ROW), max_size=3)).map(list)),
    st.tuples(st.just(p.Command.CANCEL), st.tuples(st.lists(st.integers(-3, 3) | msgpackable,
                                                            max_size=3)).map(list)),
)


@PROPERTY
@given(near_valid_envelopes, st.lists(st.binary(max_size=4), max_size=5))
def test_nearly_valid_batches_raise_only_protocol_error(case: tuple[p.Command, list[Any]],
                                                         payload: list[bytes]) -> None:
    command, envelope = case
    _only_protocol_errors(frames_of(command, envelope, *payload))


# ---- bounds on what a peer may say -----------------------------------------------------------------

LONG_ID = "i" * (p.MAX_ID_CHARS + 1)
LONG_TEXT = "t" * (p.MAX_TEXT_CHARS + 1)
BIG_MAP = {f"k{i}": "v" * 64 for i in range(p.MAX_INFO_COST // 64)}
BIG_OPTIONS = {"env": {f"K{i}": "v" * 1000 for i in range(p.MAX_OPTIONS_COST // 1000 + 1)}}
LONG_FN_ID = b"f" * (p.MAX_FN_ID_BYTES + 1)

OVERSIZED: dict[str, p.Message] = {
    "hello host": p.Hello("worker", "w-1", "h" * (p.MAX_HOST_CHARS + 1), 1, 1, {}),
    "hello peer id": p.Hello("client", LONG_ID, "h", 1),
    "hello role": p.Hello(LONG_ID, "w-1", "h", 1),
    "hello info": p.Hello("client", "c-1", "h", 1, 0, {"session": "s" * p.MAX_INFO_COST}),
    "hello info of many keys": p.Hello("worker", "w-1", "h", 1, 1, BIG_MAP),
    "hello info nested deep": p.Hello("worker", "w-1", "h", 1, 1, {"tags": [["x" * 100] * 50]}),
    "welcome broker id": p.Welcome(LONG_ID, 1.0, 3, 100),
    "welcome info": p.Welcome("b-1", 1.0, 3, 100, BIG_MAP),
    "refused reason": p.Refused(LONG_TEXT),
    "reconnect reason": p.Reconnect(LONG_TEXT),
    "disconnect reason": p.Disconnect(LONG_TEXT),
    "submit fn id": p.Submit(LONG_FN_ID, False, [[0, 1, {}]], [b"a"]),
    "submit options": p.Submit(FN_ID, False, [[0, 1, BIG_OPTIONS]], [b"a"]),
    "jobs client id": p.Jobs([], [[LONG_ID, 0, 1, FN_ID, 0, {}]]),
    "jobs fn id": p.Jobs([], [["c-1", 0, 1, LONG_FN_ID, 0, {}]]),
    "jobs fns": p.Jobs([LONG_FN_ID], [], [b"fn"]),
    "jobs options": p.Jobs([], [["c-1", 0, 1, FN_ID, 0, BIG_OPTIONS]]),
    "results client id": p.Results(1, [[LONG_ID, 0, 1, 0, 0, ""]]),
    "results info": p.Results(1, [["c-1", 0, 1, 1, 0, LONG_TEXT]]),
    "result info": p.Result([[0, 1, 0, LONG_TEXT, 0]]),
    "result stats host": p.Result([[0, 0, 0, "", 0]], [], [["w-1", "h" * 256, 1, 0.0, 0.0, 0.0, 0.0, 0]]),
    "cancel jobs client id": p.CancelJobs([[LONG_ID, 1]]),
}


@pytest.mark.parametrize("msg", OVERSIZED.values(), ids=OVERSIZED.keys())
def test_a_field_over_its_bound_is_refused_naming_it(msg: p.Message) -> None:
    with pytest.raises(FieldTooLarge) as info:
        p.decode(p.encode(msg))
    assert isinstance(info.value, ProtocolError)
    assert f"limit of {info.value.limit}" in str(info.value)
    assert len(str(info.value)) < 200, "the refusal must not repeat the field"


def test_fields_at_their_bound_are_accepted() -> None:
    at_bound = [
        p.Hello("worker", "i" * p.MAX_ID_CHARS, "h" * p.MAX_HOST_CHARS, 1, 1, {"prefetch": 1, "gpus": [0]}),
        p.Refused("t" * p.MAX_TEXT_CHARS),
        p.Results(1, [["i" * p.MAX_ID_CHARS, 0, 1, 1, 0, "t" * p.MAX_TEXT_CHARS]], []),
        p.Submit(b"f" * p.MAX_FN_ID_BYTES, False, [[0, 0, {"timeout_s": 5.0, "mem_limit": 2**30}]], []),
    ]
    for msg in at_bound:
        assert p.decode(p.encode(msg)) == msg


def test_oversized_host_names_its_length() -> None:
    with pytest.raises(FieldTooLarge, match="HELLO host is 50000 long, over its limit of 255"):
        p.decode(p.encode(p.Hello("worker", "w-1", "h" * 50_000, 1, 1, {})))


def test_map_cost_counts_texts_and_entries_and_stops_past_the_budget() -> None:
    assert p.map_cost({"prefetch": 1}, 100) == 1 + 1 + len("prefetch") + 1
    assert p.map_cost({"tags": ["ab", 3]}, 100) == 2 + 4 + 3 + 2 + 1
    huge = {str(i): i for i in range(100_000)}
    assert p.map_cost(huge, 10) == 1 + len(huge), "a map over the budget is not walked"


def test_field_too_large_survives_pickling() -> None:
    import pickle

    error = FieldTooLarge("HELLO host", 255, 50_000)
    again = pickle.loads(pickle.dumps(error))
    assert (again.field, again.limit, again.size, str(again)) == ("HELLO host", 255, 50_000, str(error))


def test_clip_bounds_peer_text_for_a_log_line() -> None:
    assert p.clip("node7") == "node7"
    clipped = p.clip("h" * 50_000)
    assert clipped.startswith("h" * p.LOG_TEXT_CHARS) and clipped.endswith("… (50000 characters)")
    assert len(clipped) < p.LOG_TEXT_CHARS + 30
    assert p.clip("evil\nFAKE LOG LINE\x1b[31m") == "evil\\nFAKE LOG LINE\\x1b[31m"


def test_is_hello_reads_only_the_header_and_command() -> None:
    assert p.is_hello(p.encode(p.Hello("client", "c", "h", 1)))
    assert not p.is_hello(p.encode(p.Heartbeat()))
    assert not p.is_hello([b"ZF\x09", bytes([p.Command.HELLO]), b""])
    assert not p.is_hello([p.HEADER])


def test_payload_limit_leaves_room_for_the_envelope_and_is_none_before_a_welcome() -> None:
    assert p.payload_limit(2**20) == 2**20 - p.ENVELOPE_ALLOWANCE
    assert p.payload_limit(0) is None
