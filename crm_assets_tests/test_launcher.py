"""The demo's run launcher: a run forked warm finishes as a run Dagster started itself
would, starts in well under the seconds a new interpreter takes, and stops when the
operator terminates it."""

import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.launcher import LaunchRunContext

from crm_assets.defs.launcher import PID_TAG, WarmRunLauncher
from crm_assets.engine.lease import FlowLease, LeaseHeld, hold, lease_info
from crm_assets.engine.state import SyncState

FLOW = "contact_to_contacts"


@dg.op
def touch(context: dg.OpExecutionContext) -> None:
    """Leave a file saying the run ran (in the folder the run's tags name)."""
    Path(context.run.tags["folder"], "ran").write_text(context.run.run_id)


@dg.op
def wait_long() -> None:
    time.sleep(120)


@dg.op
def hold_flow_then_wait(context: dg.OpExecutionContext) -> None:
    """Hold a flow's lease as a run's mapped step does, then work long (no step of its
    own catches the interrupt, as a run stopped between steps)."""
    state = SyncState(context.run.tags["state"])
    hold(FlowLease(state, FLOW, context.run.run_id, f"run {context.run.run_id[:12]} (test)"))
    time.sleep(120)


@dg.job(executor_def=dg.in_process_executor)
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


def launch(instance: dg.DagsterInstance, job: dg.JobDefinition, **tags: str) -> str:
    recon = ReconstructableJob.for_file(__file__, job.name)  # by path: pytest's own import
    run = instance.create_run_for_job(
        job_def=job, job_code_origin=recon.get_python_origin(), tags=tags
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


def test_a_warm_run_succeeds_and_the_next_starts_fast(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    started = time.monotonic()
    first = finished(instance, launch(instance, touch_job, folder=str(tmp_path)))
    cold = time.monotonic() - started  # the fork server starts: Dagster and the project load
    assert first.status == dg.DagsterRunStatus.SUCCESS, failure_of(instance, first.run_id)
    assert (tmp_path / "ran").read_text() == first.run_id
    assert first.tags[PID_TAG].isdigit()
    started = time.monotonic()
    second = finished(instance, launch(instance, touch_job, folder=str(tmp_path)))
    warm = time.monotonic() - started
    assert second.status == dg.DagsterRunStatus.SUCCESS, failure_of(instance, second.run_id)
    assert warm < cold / 2, f"a warm run took {warm:.2f} s, the first {cold:.2f} s"


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
    """Terminated from the UI while it holds a flow, a run gives the flow back as it ends:
    the next sync starts at once instead of being refused until the lease expires."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    run_id = launch(instance, holding_job, state=url)
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
