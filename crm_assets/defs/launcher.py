"""A run launcher for one machine whose runs start warm.

Dagster's default launcher starts every run in a new interpreter, which spends about
4 s importing Dagster and the project before the first step: most of a sensor's
edit-to-visible time on the demo. This one forks each run from a server process
(:mod:`multiprocessing`'s *forkserver*) that imported them once, so a run reaches
its first step in well under a second. The fork server is single-threaded, which is
what makes forking it safe; the run then executes as ``dagster api execute_run``
would (same events, same failure handling).

For one machine (the demo, ``make demo``): a deployment across machines keeps its own
launcher (``deploy/dagster.yaml``, the Kubernetes launcher of the Helm values).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from multiprocessing.context import ForkServerContext
from typing import Any

import dagster as dg
from dagster._core.launcher import LaunchRunContext, RunLauncher
from dagster._serdes import ConfigurableClass, ConfigurableClassData

#: The run tag holding the process id of a run's worker (how any process stops it).
PID_TAG = "crm_sync/worker_pid"
#: What the fork server imports once, for every run to start with.
PRELOAD = ["dagster", "polars", "httpx", "sqlalchemy", "crm_assets.definitions"]


def _execute_run(run_id: str, instance_ref: Any) -> None:
    """The run worker: what ``dagster api execute_run`` does, in a forked process."""
    from dagster._cli.api import _execute_run_command_body
    from dagster._utils.interrupts import capture_interrupts, setup_interrupt_handlers

    from crm_assets.engine.lease import release_held

    setup_interrupt_handlers()  # SIGTERM (terminate) stops the run as SIGINT would
    try:
        with capture_interrupts(), dg.DagsterInstance.from_ref(instance_ref) as instance:
            _execute_run_command_body(run_id, instance, lambda _event: None, False)
    finally:
        # a forked process ends without running atexit: a run terminated between steps,
        # or in a step that does not catch the interrupt, gives its flows back here
        release_held(run_id)


class WarmRunLauncher(RunLauncher, ConfigurableClass):
    """Launches each run in a process forked from one with Dagster and the project loaded."""

    def __init__(self, inst_data: ConfigurableClassData | None = None) -> None:
        self._inst_data = inst_data
        self._context: ForkServerContext | None = None
        self._workers: dict[str, multiprocessing.process.BaseProcess] = {}
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: dict[str, Any]
    ) -> WarmRunLauncher:
        return cls(inst_data=inst_data)

    def _fork_server(self) -> ForkServerContext:
        if self._context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)
            self._context = context
        return self._context

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        self._reap()
        worker = self._fork_server().Process(
            target=_execute_run, args=(run.run_id, self._instance.get_ref()), daemon=False
        )
        worker.start()
        self._workers[run.run_id] = worker
        self._instance.add_run_tags(run.run_id, {PID_TAG: str(worker.pid)})

    def _reap(self) -> None:
        """Forget (and collect) the workers that have finished."""
        for run_id, worker in list(self._workers.items()):
            if not worker.is_alive():
                worker.join()
                del self._workers[run_id]

    def terminate(self, run_id: str) -> bool:
        """Stop a run's worker by its process id (any process of this machine can)."""
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished or PID_TAG not in run.tags:
            return False
        self._instance.report_run_canceling(run)
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(run.tags[PID_TAG]), signal.SIGTERM)
            return True
        return False

    def join(self, timeout: int = 30) -> None:
        for worker in self._workers.values():
            worker.join(timeout)
