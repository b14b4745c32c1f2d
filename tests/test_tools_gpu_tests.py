# SPDX-License-Identifier: Apache-2.0
"""tools/gpu_tests.py, the GPU tests' driver: a crash costs one test, not the run."""
import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_tests", ROOT / "tools" / "gpu_tests.py")
gpu_tests = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_tests)

CASES = '''
import os, signal, time, pytest
def test_a(): pass
def test_b(): os.kill(os.getpid(), signal.SIGSEGV)
def test_c(): assert 1 == 2
@pytest.mark.parametrize("x", [1, 2])
def test_d(x): pass
def test_e(): pytest.skip("no")
def test_f(): os.abort()
def test_g(): pass
'''


@pytest.mark.parametrize("jobs", [1, 2])
def test_crashes_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch, jobs):
    (tmp_path / "test_cases.py").write_text(CASES)
    monkeypatch.chdir(tmp_path)
    rc = gpu_tests.main(["out", "--marker", "", "--first", "test_d", "--jobs", str(jobs), "--block", "1",
                         "test_cases.py"])
    s = json.loads((tmp_path / "out" / "gpu_tests.json").read_text())
    assert rc == 1
    assert s["collected"] == 8
    assert (s["passed"], s["failed"], s["skipped"], s["crashed"]) == (4, 1, 1, 2)
    assert s["failed_ids"] == ["test_cases.py::test_c"]
    # --first puts test_d's two cases ahead, so test_b crashes after them
    assert s["crashed_ids"] == ["test_cases.py::test_b", "test_cases.py::test_f"]
    assert s["not_run_ids"] == []
    log = (tmp_path / "out" / "pytest_gpu.log").read_text()
    if jobs == 1:
        assert log.index("test_d[2] PASSED") < log.index("test_b")
        assert "going on with the 4 tests after it" in log
    else:  # every other test of d[1] d[2] a b c e f g: j0 d[1] a c f(crash), j1 d[2] b(crash) e g
        assert "[j0] test_cases.py::test_d[1] PASSED" in log
        assert "[j1] test_cases.py::test_d[2] PASSED" in log
        assert "[j0] === gpu_tests: the process ended with status -6 in test_cases.py::test_f" in log
        assert "[j1] === gpu_tests: the process ended with status -11 in test_cases.py::test_b" in log


def test_the_deadline_stops_the_run_and_lists_what_did_not_run(tmp_path, monkeypatch):
    (tmp_path / "test_slow.py").write_text(
        "import time\ndef test_a(): pass\ndef test_b(): time.sleep(120)\ndef test_c(): pass\n")
    monkeypatch.chdir(tmp_path)
    rc = gpu_tests.main(["out", "--marker", "", "--timeout", "8", "test_slow.py"])
    s = json.loads((tmp_path / "out" / "gpu_tests.json").read_text())
    assert rc == 1 and s["passed"] == 1
    assert s["not_run_ids"] == ["test_slow.py::test_b", "test_slow.py::test_c"]


def test_order_puts_the_first_names_ahead_once():
    ids = ["a::x", "b::y", "a::z", "c::w"]
    assert gpu_tests.order(ids, ["c::", "a::", "a::z"]) == ["c::w", "a::x", "a::z", "b::y"]


def test_deal_gives_blocks_of_neighbours_round_robin():
    ids = [f"t{i}" for i in range(7)]
    assert gpu_tests.deal(ids, 2, 3) == [["t0", "t1", "t2", "t6"], ["t3", "t4", "t5"]]
    assert gpu_tests.deal(ids, 3, 1) == [["t0", "t3", "t6"], ["t1", "t4"], ["t2", "t5"]]
    assert gpu_tests.deal(ids, 1, 8) == [ids]
