"""Run one function in several spawned local processes and wait for all of them (the demo's extraction
parts, `refseg-sweep --processes`). Spawned, not forked: torch's OpenMP state and the parent's threads
must not be copied into the children."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Callable


def run_in_processes(fn: Callable, calls: list[tuple]) -> list:
    """fn(*args) for each args of `calls`, each in its own spawned process; -> their results in order.
    Every process finishes (or fails) before the first error, if any, is raised here."""
    with ProcessPoolExecutor(len(calls), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(fn, *args) for args in calls]
        errors = [future.exception() for future in futures]  # waits for every process
    for error in errors:
        if error is not None:
            raise error
    return [future.result() for future in futures]
