"""Settings: flag → ZFARM_* variable → default, and clear ConfigErrors for bad values."""

from __future__ import annotations

import argparse
import re

import pytest

from zfarm.cli_args import size_bytes
from zfarm.config import (
    DEFAULT_ADDRESS,
    BrokerSettings,
    ClientSettings,
    WorkerSettings,
    check_endpoint,
    parse_amount,
    resolve,
)
from zfarm.errors import ConfigError


def test_defaults_when_nothing_is_set() -> None:
    s = resolve(BrokerSettings, {}, {})
    assert s == BrokerSettings()
    assert (s.bind, s.heartbeat_interval_s, s.liveness) == (DEFAULT_ADDRESS, 1.0, 3)


def test_environment_overrides_default() -> None:
    env = {"ZFARM_HEARTBEAT_INTERVAL_S": "0.25", "ZFARM_LIVENESS": "5", "ZFARM_BIND": "ipc:///tmp/zf.sock"}
    s = resolve(BrokerSettings, {}, env)
    assert (s.heartbeat_interval_s, s.liveness, s.bind) == (0.25, 5, "ipc:///tmp/zf.sock")
    assert isinstance(s.heartbeat_interval_s, float) and isinstance(s.liveness, int)


def test_flag_overrides_environment() -> None:
    env = {"ZFARM_HEARTBEAT_INTERVAL_S": "0.25", "ZFARM_LIVENESS": "5"}
    s = resolve(BrokerSettings, {"heartbeat_interval_s": 2.0, "liveness": None}, env)
    assert s.heartbeat_interval_s == 2.0  # the flag
    assert s.liveness == 5  # a flag left as None falls through to the variable


def test_empty_variable_means_unset() -> None:
    assert resolve(BrokerSettings, {}, {"ZFARM_LIVENESS": ""}).liveness == 3


def test_environ_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZFARM_LIVENESS", "7")
    assert resolve(BrokerSettings).liveness == 7
    assert resolve(BrokerSettings, {}, {}).liveness == 3  # an explicit mapping is used instead


def test_worker_and_client_settings_resolve_too() -> None:
    w = resolve(WorkerSettings, {"procs": 3}, {"ZFARM_PROCS": "8", "ZFARM_GRACE_S": "1.5",
                                               "ZFARM_WORKER_ID": "gpu-7"})
    assert (w.procs, w.grace_s, w.worker_id, w.slots) == (3, 1.5, "gpu-7", 3)
    c = resolve(ClientSettings, {}, {"ZFARM_WINDOW": "16", "ZFARM_ADDRESS": "tcp://10.0.0.1:6000"})
    assert (c.window, c.address) == (16, "tcp://10.0.0.1:6000")


@pytest.mark.parametrize(("variable", "value"), [
    ("ZFARM_HEARTBEAT_INTERVAL_S", "fast"),
    ("ZFARM_HEARTBEAT_INTERVAL_S", "-1"),
    ("ZFARM_HEARTBEAT_INTERVAL_S", "0"),
    ("ZFARM_HEARTBEAT_INTERVAL_S", "nan"),
    ("ZFARM_HEARTBEAT_INTERVAL_S", "inf"),
    ("ZFARM_LIVENESS", "3.5"),
    ("ZFARM_LIVENESS", "three"),
    ("ZFARM_LIVENESS", "0"),
    ("ZFARM_MAX_MESSAGE_BYTES", "-5"),
])
def test_bad_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(BrokerSettings, {}, {variable: value})
    # the message names the setting (as the variable or as the field it sets)
    assert variable.removeprefix("ZFARM_").lower() in str(info.value).lower()


@pytest.mark.parametrize(("variable", "value"), [("ZFARM_PROCS", "-1"), ("ZFARM_PREFETCH", "-2"),
                                                 ("ZFARM_PROCS", "many"), ("ZFARM_GRACE_S", "soon")])
def test_bad_worker_values(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(WorkerSettings, {}, {variable: value})
    assert variable.removeprefix("ZFARM_").lower() in str(info.value).lower()


def test_bad_flag_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="liveness"):
        resolve(BrokerSettings, {"liveness": -1}, {})


def test_unknown_flag_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="heartbeat_intreval_s"):
        resolve(BrokerSettings, {"heartbeat_intreval_s": 1.0}, {})


@pytest.mark.parametrize("address", [
    "localhost:5555", "127.0.0.1", "http://127.0.0.1:5555", "tcp://", "", "tcp:/127.0.0.1:5555",
])
def test_bad_endpoints(address: str) -> None:
    with pytest.raises(ConfigError, match="ZeroMQ endpoint"):
        resolve(BrokerSettings, {"bind": address}, {})
    with pytest.raises(ConfigError, match="ZeroMQ endpoint"):
        resolve(WorkerSettings, {}, {"ZFARM_ADDRESS": address or "nonsense"})
    with pytest.raises(ConfigError, match="ZeroMQ endpoint"):
        ClientSettings(address=address)


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:5555", "tcp://*:6000", "ipc:///tmp/x.sock", "inproc://a",
                                     "tcp://127.0.0.1:*", "tcp://127.0.0.1:0", "tcp://*:*", "tcp://[::1]:5555",
                                     "tcp://localhost:65535", "ipc://@abstract-name", "ipc://relative.sock"])
def test_good_endpoints(address: str) -> None:
    assert resolve(BrokerSettings, {"bind": address}, {}).bind == address


# (address, what the message says); each one, given to a client, a worker or a monitor, must fail
# here at once rather than reach ZeroMQ (where some hung a constructor or a worker for ever)
BAD_CONNECT_ENDPOINTS = [
    ("tcp://127.0.0.1", "port is missing"),
    ("tcp://127.0.0.1:", "port must be a number from 1 to 65535"),
    ("tcp://127.0.0.1:abc", "port must be a number from 1 to 65535, not 'abc'"),
    ("tcp://127.0.0.1:99999", "not '99999'"),
    ("tcp://127.0.0.1:65536", "not '65536'"),
    ("tcp://127.0.0.1:-1", "not '-1'"),
    ("tcp://127.0.0.1:0", "only a broker's --bind"),
    ("tcp://127.0.0.1:*", "only a broker's --bind"),
    ("tcp://*:5555", "is for binding"),
    ("tcp://:5555", "port is missing"),
    ("tcp://::1:5555", "IPv6 address goes in brackets, as in tcp://[::1]:5555"),
    ("tcp://[nope]:5555", "[nope] is not an IPv6 address"),
    ("tcp://300.1.2.3:5555", "300.1.2.3 is not an IPv4 address"),
    ("tcp://bad host:5555", "'bad host' is not a host name"),
    ("ipc://", "not a ZeroMQ endpoint"),
    ("ipc:///tmp/" + "x" * 120, "bytes long"),
    ("inproc://a", "same process"),
    ("localhost:5555", "not a ZeroMQ endpoint"),
]


@pytest.mark.parametrize(("address", "problem"), BAD_CONNECT_ENDPOINTS)
def test_bad_connect_endpoints_name_the_value_the_problem_and_an_example(address: str, problem: str) -> None:
    for build in (lambda: ClientSettings(address=address), lambda: check_endpoint(address),
                  lambda: resolve(ClientSettings, {}, {"ZFARM_ADDRESS": address})):
        with pytest.raises(ConfigError) as info:
            build()
        message = str(info.value)
        assert problem in message and address in message and DEFAULT_ADDRESS in message, message


@pytest.mark.parametrize(("address", "problem"), [
    ("tcp://127.0.0.1", "port is missing"),
    ("tcp://127.0.0.1:99999", "not '99999'"),
    ("tcp://*:70000", "not '70000'"),
    ("ipc:///no/such/folder/broker.sock", "the folder /no/such/folder does not exist"),
    ("ipc:///tmp/" + "y" * 120, "bytes long"),
])
def test_bad_bind_endpoints(address: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        BrokerSettings(bind=address)


def test_workers_refuse_what_they_cannot_connect_to_and_keep_inproc_for_embedding() -> None:
    with pytest.raises(ConfigError, match="port is missing"):
        WorkerSettings(address="tcp://127.0.0.1")
    with pytest.raises(ConfigError, match="is for binding"):
        WorkerSettings(address="tcp://*:5555")
    assert WorkerSettings(address="inproc://farm").address == "inproc://farm"  # a shared context


def test_settings_are_frozen() -> None:
    s = BrokerSettings()
    with pytest.raises(AttributeError):
        s.liveness = 9  # type: ignore[misc]


@pytest.mark.parametrize("name", ["sweep-42", "a", "run.2026_11_23", "x" * 100])
def test_good_session_names(name: str) -> None:
    assert ClientSettings(session=name).session == name


@pytest.mark.parametrize("name", ["-leading-dash", "has space", "slash/name", "x" * 101, "é"])
def test_bad_session_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(ConfigError, match="letters, digits"):
        ClientSettings(session=name)


def test_journal_sync_must_be_full_or_normal() -> None:
    assert BrokerSettings(journal_sync="NORMAL").journal_sync == "normal"  # as ZFARM_JOURNAL_SYNC=NORMAL
    with pytest.raises(ConfigError, match="full or normal"):
        BrokerSettings(journal_sync="sometimes")


@pytest.mark.parametrize("text", ["512", "500M", "500m", "3Mi", "3MiB", "2G", "1.5g", "1T", "1P", "4 G"])
def test_a_size_flag_takes_what_a_mem_request_takes(text: str) -> None:
    assert size_bytes(text) == int(parse_amount("mem", text)) > 0


@pytest.mark.parametrize("text", ["0", "0M", "-1G", "", "G", "1e3", "inf", "nan", "2X", "1.5.2M"])
def test_a_size_flag_refuses_nothing_and_non_sizes_naming_the_value(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(text))):
        size_bytes(text)
