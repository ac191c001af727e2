"""What a cluster's workers offer (resources, tags) and how a cluster reads in `zfarm status`: plain data."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

import zfarm
from zfarm.cluster.offer import offer_args, resources_text, tags_text, with_slurm_mem
from zfarm.cluster.profile import ProfileError, load_profile, with_overrides
from zfarm.config import parse_resources
from zfarm.errors import ConfigError
from zfarm.monitor import cluster_line


@pytest.mark.parametrize(("given", "text"), [
    (None, ""),
    ({"gpus": 1}, "gpus=1"),
    ({"gpus": 2, "mem": "32G", "scratch": 0.5}, "gpus=2,mem=32G,scratch=0.5"),
    ({"scratch": 1e-7, "licenses": 1e20}, "scratch=0.0000001,licenses=100000000000000000000"),
    (" cpus=8 , mem=4G ", "cpus=8,mem=4G"),
])
def test_resources_become_the_worker_s_text(given: Any, text: str) -> None:
    assert resources_text(given) == text
    read = parse_resources(text)  # what the worker's --resources reads: the very amounts given
    for name, amount in (given.items() if isinstance(given, dict) else ()):
        if not isinstance(amount, str):
            assert read[name] == amount


@pytest.mark.parametrize(("given", "named"), [
    ({"gpus": -1}, "gpus=-1"),
    ({"gpus": "two"}, "gpus='two'"),
    ({"gpus": True}, "gpus=True"),
    ({"cpus": "4G"}, "cpus='4G'"),
    ({"1gpu": 1}, "'1gpu'"),
    ({"gpus": float("nan")}, "gpus=nan"),
    ({"gpus": float("inf")}, "gpus=inf"),
    ({"mem": float("inf")}, "mem=inf"),
    ("gpus", "'gpus'"),
    (["gpus=1"], "['gpus=1']"),
])
def test_bad_resources_are_a_config_error_naming_them(given: Any, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        resources_text(given)


def test_tags_become_the_worker_s_text_and_bad_ones_are_named() -> None:
    assert tags_text({"bigmem"}) == "bigmem"
    assert tags_text(["b", "a", "b"]) == "a,b"
    assert tags_text("bigmem, avx512") == "bigmem,avx512"
    assert offer_args("gpus=1", "bigmem") == ["--resources", "gpus=1", "--tags", "bigmem"]
    assert offer_args("", "") == []
    for bad in (["big mem"], [3], {"a": 1}, "9lives"):
        with pytest.raises(ConfigError, match="tag"):
            tags_text(bad)  # type: ignore[arg-type]


def test_a_slurm_worker_offers_its_job_s_memory_unless_told_otherwise() -> None:
    assert with_slurm_mem("", "4G") == "mem=4G"
    assert with_slurm_mem("gpus=1", "4000") == "gpus=1,mem=4000M"  # Slurm's unit is the megabyte
    assert with_slurm_mem("mem=2G", "4G") == "mem=2G"
    assert with_slurm_mem("gpus=1", None) == "gpus=1"
    assert with_slurm_mem("", "4G-ish") == ""
    assert with_slurm_mem("", "0") == ""  # Slurm's "all of the node's memory"


def test_a_cluster_with_bad_resources_is_refused_before_it_starts_anything() -> None:
    with pytest.raises(ConfigError, match="gpus=-2"):
        zfarm.LocalCluster(n_workers=1, resources={"gpus": -2})


def test_profile_resources_and_tags_are_checked_naming_the_file_and_key(tmp_path: Path) -> None:
    toml = tmp_path / "zfarm.toml"
    toml.write_text(textwrap.dedent("""
        [profiles.good]
        launcher = "local"
        resources = { gpus = 1, mem = "32G" }
        tags = ["bigmem"]
        [profiles.text]
        launcher = "local"
        resources = "gpus=1"
        tags = "bigmem,avx512"
        [profiles.badamount]
        launcher = "local"
        resources = { gpus = "lots" }
        [profiles.badentry]
        launcher = "slurm"
        resources = "gpus"
        [profiles.badtag]
        launcher = "ssh"
        hosts = ["a"]
        tags = ["big mem"]
        [profiles.badtype]
        launcher = "local"
        tags = 3
    """))
    good = load_profile("good", [toml])
    assert good.settings["resources"] == {"gpus": 1, "mem": "32G"} and good.settings["tags"] == ["bigmem"]
    assert load_profile("text", [toml]).settings["tags"] == "bigmem,avx512"
    with pytest.raises(ProfileError, match=r"\[profiles.badamount\] resources: resource gpus='lots'.*write "):
        load_profile("badamount", [toml])
    with pytest.raises(ProfileError, match=r"\[profiles.badentry\] resources: .*'gpus'"):
        load_profile("badentry", [toml])
    with pytest.raises(ProfileError, match=r"\[profiles.badtag\] tags: tags 'big mem'"):
        load_profile("badtag", [toml])
    with pytest.raises(ProfileError, match=r"\[profiles.badtype\] tags: is 3; write"):
        load_profile("badtype", [toml])
    assert with_overrides(good, resources="gpus=2", tags=None).settings == {
        "resources": "gpus=2", "tags": ["bigmem"]}
    with pytest.raises(ConfigError, match=r"^--resources: resource gpus='-1'"):
        with_overrides(good, resources="gpus=-1")


def test_a_cluster_line_says_running_coming_pending_and_wanted() -> None:
    row: dict[str, Any] = {"id": "slurm-3f2a1c", "name": "", "launcher": "slurm", "requested": 4,
                           "running": 2, "coming": 1, "pending": 1, "retiring": 0, "failed": 0,
                           "adapt": {"minimum": 0, "maximum": 8}}
    assert cluster_line(row) == ("cluster slurm-3f2a1c (slurm): 2 running, 1 coming (1 pending in Slurm), "
                                 "wants 4 (adapt 0-8)")
    row.update(name="lab", launcher="ssh", pending=0, retiring=1, failed=2, adapt=None)
    assert cluster_line(row) == ("cluster lab (ssh, slurm-3f2a1c): 2 running, 1 coming, 1 retiring, "
                                 "2 failed, wants 4")
    row.update(every_s=2.0, report_age_s=4.5)  # one report late: nothing said yet
    assert cluster_line(row).endswith("wants 4")
    row.update(report_age_s=12.4)  # silent a while (its process killed?): the line says how stale it is
    assert cluster_line(row).endswith("wants 4 (last report 12 s ago)")


def test_a_cluster_line_shows_control_characters_escaped() -> None:
    row: dict[str, Any] = {"id": "c-1\x1b[2J", "name": "lab\x1b]0;owned\x07", "launcher": "slurm\r",
                           "requested": 1, "running": 0, "coming": 1, "pending": 0, "adapt": None}
    line = cluster_line(row)
    assert line.isprintable(), line
    assert "\\x1b[2J" in line and "\\x07" in line and "\\r" in line
