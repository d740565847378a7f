"""A worker pins itself to its slice of the cores (app.process.cpus), in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.server import ROOT

PIN = """
import json, os, sys
from app.process import cpus
cpus.CGROUP_CPU_MAX = cpus.Path(sys.argv[1])
os.sched_setaffinity(0, json.loads(sys.argv[2]))
pinned = cpus.pin_worker(1, 2)
print(json.dumps([pinned, sorted(os.sched_getaffinity(0)), cpus.cpu_share(2)]))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin to")
@pytest.mark.parametrize("quota", [False, True], ids=["no-quota", "quota"])
def test_a_worker_pins_itself_to_its_slice_of_the_cores_unless_a_quota_applies(
    tmp_path: Path, quota: bool
) -> None:
    # In a child process: pinning the test runner would slow every later test.
    cgroup = tmp_path / "cpu.max"
    if quota:
        cgroup.write_text("100000 100000\n")
    two = sorted(os.sched_getaffinity(0))[:2]
    run = [sys.executable, "-c", PIN, str(cgroup), json.dumps(two)]
    out = subprocess.run(run, capture_output=True, text=True, check=True, cwd=ROOT)
    pinned, affinity, share = json.loads(out.stdout)
    if quota:  # the affinity lists cores the quota never lets us fill: left alone
        assert (pinned, affinity, share) == (None, two, 1)
    else:  # worker 1 of 2 gets the second core, and then that core is its whole share
        assert (pinned, affinity, share) == ([two[1]], [two[1]], 1)
