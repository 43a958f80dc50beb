"""refseg.core.processes.run_in_processes: results in call order; a failing process's error is raised
only once every other process has finished (nothing they write is cut short)."""

import subprocess
import sys

import pytest

from refseg.core.processes import run_in_processes


def test_results_come_back_in_call_order():
    assert run_in_processes(divmod, [(7, 2), (9, 4), (1, 1)]) == [(3, 1), (2, 1), (1, 0)]


def test_the_first_error_is_raised_after_every_process_has_finished(tmp_path):
    done = tmp_path / "done"
    slow = [sys.executable, "-c", f"import time; time.sleep(1.5); open({str(done)!r}, 'w').write('x')"]
    with pytest.raises(subprocess.CalledProcessError):
        run_in_processes(subprocess.check_call, [([sys.executable, "-c", "raise SystemExit(3)"],), (slow,)])
    assert done.read_text() == "x"
