"""The demo's run launcher: a run forked warm finishes as a run Dagster started itself
would, starts in well under the seconds a new interpreter takes, and stops when the
operator terminates it."""

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.launcher import LaunchRunContext

from crm_assets.defs.launcher import PID_TAG, PRELOAD, WarmRunLauncher
from crm_assets.defs.resources import SyncStorage
from crm_assets.engine.lease import FlowLease, LeaseHeld, hold, lease_info
from crm_assets.engine.state import SyncState

FLOW = "contact_to_contacts"


@dg.op
def touch(context: dg.OpExecutionContext) -> None:
    """Leave a file saying the run ran (in the folder the run's tags name), and which of
    the modules the launcher preloads its process started with (this job imports none of
    the project's definitions or httpx itself)."""
    folder = Path(context.run.tags["folder"])
    folder.joinpath("ran").write_text(context.run.run_id)
    folder.joinpath("loaded").write_text(" ".join(m for m in PRELOAD if m in sys.modules))


@dg.op
def wait_long() -> None:
    time.sleep(120)


@dg.op(required_resource_keys={"storage"})
def hold_flow_then_wait(context: dg.OpExecutionContext) -> None:
    """Hold a flow's lease as a run's mapped step does, through the project's storage,
    then work long (no step of its own catches the interrupt, as a run stopped between
    steps)."""
    state = context.resources.storage.state()
    hold(FlowLease(state, FLOW, context.run.run_id, f"run {context.run.run_id[:12]} (test)"))
    time.sleep(120)


@dg.job(
    executor_def=dg.in_process_executor,
    resource_defs={"storage": SyncStorage.configure_at_launch()},
)
def holding_job() -> None:
    hold_flow_then_wait()


@dg.job(executor_def=dg.in_process_executor)
def touch_job() -> None:
    touch()


@dg.job(executor_def=dg.in_process_executor)
def slow_job() -> None:
    wait_long()


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    launcher = {"module": "crm_assets.defs.launcher", "class": "WarmRunLauncher"}
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(
        overrides={"run_launcher": launcher}, temp_dir=str(tmp_path / "home")
    ) as found:
        yield found


def launch(
    instance: dg.DagsterInstance,
    job: dg.JobDefinition,
    run_config: dict[str, Any] | None = None,
    **tags: str,
) -> str:
    recon = ReconstructableJob.for_file(__file__, job.name)  # by path: pytest's own import
    run = instance.create_run_for_job(
        job_def=job, job_code_origin=recon.get_python_origin(), tags=tags, run_config=run_config
    )
    launcher = instance.run_launcher
    assert isinstance(launcher, WarmRunLauncher)
    launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    return run.run_id


def finished(instance: dg.DagsterInstance, run_id: str, timeout: float = 90) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.is_finished:
            return run
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} did not finish within {timeout} s")


def failure_of(instance: dg.DagsterInstance, run_id: str) -> str:
    """What the run's event log says went wrong (for the assertion message)."""
    return "\n".join(
        f"{e.dagster_event.event_type_value}: {e.message} {e.dagster_event.event_specific_data}"
        for e in instance.all_logs(run_id)
        if e.dagster_event is not None
    )


def test_each_run_starts_in_a_process_with_dagster_and_the_project_loaded(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """What makes a warm run fast, asserted as such (a time measured under the suite's
    load is not): each run's process already holds the modules a new interpreter spends
    seconds importing, which a new interpreter running this job would not."""
    for _ in range(2):  # the first starts the fork server, the next reuses it
        run = finished(instance, launch(instance, touch_job, folder=str(tmp_path)))
        assert run.status == dg.DagsterRunStatus.SUCCESS, failure_of(instance, run.run_id)
        assert (tmp_path / "ran").read_text() == run.run_id
        assert run.tags[PID_TAG].isdigit()
        assert (tmp_path / "loaded").read_text().split() == PRELOAD


def test_terminate_stops_a_warm_run(instance: dg.DagsterInstance) -> None:
    run_id = launch(instance, slow_job)
    deadline = time.monotonic() + 60
    while not instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START):
        assert time.monotonic() < deadline, "the slow run never started its step"
        time.sleep(0.1)
    assert instance.run_launcher.terminate(run_id)
    run = finished(instance, run_id, timeout=30)
    assert run.status in (dg.DagsterRunStatus.CANCELED, dg.DagsterRunStatus.FAILURE)


def test_a_terminated_run_gives_its_flow_back_at_once(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """Terminated from the UI while it holds a flow, a run gives the flow back before it is
    reported finished: the next sync, started on that report, takes the flow at once
    instead of being refused until the lease expires."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    storage = {"data_url": str(tmp_path / "data"), "state_url": url}
    run_id = launch(instance, holding_job, {"resources": {"storage": {"config": storage}}})
    deadline = time.monotonic() + 60
    while (info := lease_info(SyncState(url), FLOW)) is None or info.run_id != run_id:
        assert time.monotonic() < deadline, "the run never took the flow's lease"
        time.sleep(0.1)
    with pytest.raises(LeaseHeld):  # held while the run works
        FlowLease(SyncState(url), FLOW, "probe", "probe").acquire(wait=0)
    assert instance.run_launcher.terminate(run_id)
    run = finished(instance, run_id, timeout=30)
    assert run.status in (dg.DagsterRunStatus.CANCELED, dg.DagsterRunStatus.FAILURE)
    info = lease_info(SyncState(url), FLOW)
    assert info is not None and info.released_at is not None, info
    FlowLease(SyncState(url), FLOW, "next", "next run").acquire(wait=0)
