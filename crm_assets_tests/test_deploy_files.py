"""The deployment files (docs/deploy.md) against the code and the Makefile.

- ``Dockerfile``: installs what ``make install`` installs (the same uv, the lock file
  synced, then the project without dependencies), bakes no secret in, runs as a
  non-root user and starts the code server as a replaceable command.
- ``deploy/dagster.yaml``: valid for Dagster's own instance config validation, with
  the queue, pool, monitoring and retry choices the sync relies on and no literal
  secret; with ``CRM_SYNC_TEST_POSTGRES_URL`` set (CI), a real instance is built
  from it on a fresh PostgreSQL database.
- ``deploy/helm/values.yaml``: names the image and the code location module, gives
  every secret the code reads (collected from the connectors, so a new connector's
  secret missing from the values fails here) to the code server and its run pods
  through a Kubernetes Secret, and none of them to the webserver or the daemon.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from dagster._core.instance.config import dagster_instance_config

from crm_assets.connectors import CONNECTORS
from crm_assets.definitions import FLOW_TAG
from crm_assets.settings import DEFAULTS, SECRET_NAMES

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
MAKEFILE = ROOT / "Makefile"
INSTANCE = ROOT / "deploy" / "dagster.yaml"
WORKSPACE = ROOT / "deploy" / "workspace.yaml"
HELM_VALUES = ROOT / "deploy" / "helm" / "values.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MODULE = PYPROJECT["tool"]["dagster"]["module_name"]  # crm_assets.definitions

#: What must reach the code only as a secret: the connectors' secrets and accounts, and
#: the state database's URL (it carries the database password).
SECRET_VARIABLES = sorted(
    {
        *SECRET_NAMES,
        *(s.name for c in CONNECTORS for s in c.settings if s.role in ("secret", "account")),
        "CRM_SYNC_STATE_URL",
    }
)
#: Where each CRM is: plain configuration, but without it nothing syncs.
BASE_URL_VARIABLES = sorted(s.name for c in CONNECTORS for s in c.settings if s.role == "base_url")
#: Dagster's own database credentials.
DAGSTER_DB_VARIABLES = ("DAGSTER_PG_URL", "DAGSTER_PG_PASSWORD")


# -- the install steps of the Makefile and of the Dockerfile ------------------------------------
def makefile_variables(text: str) -> dict[str, str]:
    return {
        m.group(1): m.group(2).strip()
        for m in re.finditer(r"^([A-Z_]+)\s*[:?]?=\s*(.*)$", text, flags=re.MULTILINE)
    }


def expand(line: str, variables: dict[str, str]) -> str:
    for _ in range(5):  # nested: $(BIN) is $(VENV)/bin
        line = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), line)
    return line


def makefile_install_commands() -> list[str]:
    """The recipe behind ``make install`` (the target ``$(VENV)/.installed``)."""
    text = MAKEFILE.read_text()
    variables = makefile_variables(text)
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("$(VENV)/.installed:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(expand(line.strip(), variables))
    return recipe


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, arguments = current.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    return instructions


def dockerfile_run_commands() -> list[str]:
    return [
        command.strip()
        for keyword, arguments in dockerfile_instructions()
        if keyword == "RUN"
        for command in arguments.split("&&")
    ]


#: options of uv/pip that take a value, and flags that do not change what is installed
OPTIONS_WITH_VALUE = {"--python", "-p"}
QUIET_FLAGS = {"-q", "--quiet", "--disable-pip-version-check", "--no-cache-dir"}


def install_step(command: str) -> tuple[str, ...] | None:
    """What an install command installs, or None for any other command.

    ``("uv", version)`` for installing uv with pip; ``("sync", lock file)``; ``("project",
    target, "--no-deps")`` for the project itself (editable or not does not matter).
    """
    tokens = shlex.split(command)
    if not tokens:
        return None
    program = Path(tokens[0]).name
    args, flags, i = [], set(), 1
    while i < len(tokens):
        token = tokens[i]
        if token in OPTIONS_WITH_VALUE:
            i += 2
            continue
        if token in ("-e", "--editable"):
            args.append(tokens[i + 1])
            i += 2
            continue
        if token == "-m":  # python -m pip
            args += tokens[i : i + 2]
            i += 2
            continue
        if token.startswith("-"):
            if token not in QUIET_FLAGS:
                flags.add(token)
        else:
            args.append(token)
        i += 1
    if program.startswith("python") and args[:3] == ["-m", "pip", "install"]:
        pins = [a for a in args[3:] if a.startswith("uv==")]
        return ("uv", pins[0].removeprefix("uv==")) if pins else None
    if program == "uv" and args[:2] == ["pip", "sync"]:
        return ("sync", *args[2:])
    if program == "uv" and args[:2] == ["pip", "install"]:
        return ("project", *args[2:], *sorted(flags))
    return None


def steps(commands: list[str]) -> list[tuple[str, ...]]:
    return [step for c in commands if (step := install_step(c)) is not None]


def test_dockerfile_installs_what_make_install_installs() -> None:
    make_steps = steps(makefile_install_commands())
    uv_version = makefile_variables(MAKEFILE.read_text())["UV_VERSION"]
    assert make_steps == [
        ("uv", uv_version),
        ("sync", "requirements.lock"),
        ("project", ".", "--no-deps"),
    ], "the Makefile's install recipe changed: update this test and the Dockerfile together"
    assert steps(dockerfile_run_commands()) == make_steps


def test_dockerfile_copies_what_the_install_reads() -> None:
    copied = " ".join(a for k, a in dockerfile_instructions() if k == "COPY").split()
    needed = [
        "requirements.lock",
        "pyproject.toml",
        PYPROJECT["project"]["readme"],  # hatchling reads it to build the wheel
        *PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"],
    ]
    for path in needed:
        assert path in copied, f"the Dockerfile does not copy {path}"
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :].count("*") == 1
    for path in needed:  # everything is ignored but what the install reads
        assert f"!{path}" in ignore or f"!{path}/" in ignore, f".dockerignore leaves out {path}"


def test_dockerfile_bakes_no_secret_in_and_runs_the_code_server() -> None:
    instructions = dockerfile_instructions()
    base = next(a for k, a in instructions if k == "FROM")
    make_python = makefile_variables(MAKEFILE.read_text())["PYTHON"]  # python3.11
    assert base == f"python:{make_python.removeprefix('python')}-slim"
    env_names = {
        m.group(1)
        for k, a in instructions
        if k in ("ENV", "ARG")
        for m in re.finditer(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", a)
    }
    assert env_names, "no ENV parsed"
    assert not env_names & {*SECRET_VARIABLES, *DAGSTER_DB_VARIABLES}
    text = DOCKERFILE.read_text()
    for name in SECRET_VARIABLES:  # not even its demo default
        if DEFAULTS.get(name):
            assert DEFAULTS[name] not in text
    user = [a for k, a in instructions if k == "USER"]
    assert user and user[-1] not in ("root", "0"), "the image must run as a non-root user"
    # the chart and the K8sRunLauncher pass the whole command as container args: an
    # ENTRYPOINT would be prepended to them
    assert not [a for k, a in instructions if k == "ENTRYPOINT"]
    cmd = yaml.safe_load(next(a for k, a in instructions if k == "CMD"))
    assert cmd == ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", MODULE]
    deployment = helm_values()["dagster-user-deployments"]["deployments"][0]
    assert str(deployment["port"]) == cmd[cmd.index("-p") + 1]
    assert [a for k, a in instructions if k == "EXPOSE"] == [str(deployment["port"])]


# -- the instance ---------------------------------------------------------------------------------
def load_instance_config(tmp_path: Path) -> dict[str, Any]:
    """``deploy/dagster.yaml`` through Dagster's own validation of an instance's config."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(INSTANCE.read_text())
    config, instance_class = dagster_instance_config(str(home))
    assert instance_class is None
    return dict(config)


def strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (str(k), *strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [str(value)]


def assert_no_password(text: str) -> None:
    """URLs in comments show a placeholder (``<password>``, ``...``), never a password."""
    for password in re.findall(r"\w+://[^\s/@:]*:([^\s/@]*)@", text):
        assert re.fullmatch(r"<[^>]*>|\.\.\.", password), f"a password in a URL: {password!r}"


def test_instance_config_is_valid_and_names_no_secret(tmp_path: Path) -> None:
    config = load_instance_config(tmp_path)
    assert config["storage"] == {"postgres": {"postgres_url": {"env": "DAGSTER_PG_URL"}}}
    assert "postgresql+psycopg2://" in INSTANCE.read_text()  # the driver its URL must name
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    runs, pools = config["concurrency"]["runs"], config["concurrency"]["pools"]
    assert runs["tag_concurrency_limits"] == [
        {"key": FLOW_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
    ]
    assert 1 <= runs["max_concurrent_runs"] <= 16
    assert pools == {"default_limit": 1, "granularity": "run"}
    monitoring = config["run_monitoring"]
    assert monitoring["enabled"] is True
    assert monitoring["max_resume_run_attempts"] == 0
    assert monitoring["start_timeout_seconds"] > 0 and monitoring["cancel_timeout_seconds"] > 0
    assert config["run_retries"]["enabled"] is True and config["run_retries"]["max_retries"] == 1
    assert config["telemetry"] == {"enabled": False}
    # no URL (with or without credentials) and no demo credential anywhere in it
    text = INSTANCE.read_text()
    assert not [s for s in strings(config) if "://" in s]
    assert_no_password(text)
    for name in SECRET_VARIABLES:
        if DEFAULTS.get(name):
            assert DEFAULTS[name] not in text


def test_workspace_points_at_the_code_server() -> None:
    (entry,) = yaml.safe_load(WORKSPACE.read_text())["load_from"]
    cmd = yaml.safe_load(next(a for k, a in dockerfile_instructions() if k == "CMD"))
    assert entry["grpc_server"]["port"] == int(cmd[cmd.index("-p") + 1])
    assert (
        entry["grpc_server"]["location_name"] == PYPROJECT["tool"]["dagster"]["code_location_name"]
    )


def test_instance_runs_on_postgresql(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The instance itself, built from the file on a fresh database of the test server."""
    server = os.environ.get("CRM_SYNC_TEST_POSTGRES_URL", "")
    if not server:
        pytest.skip(
            "CRM_SYNC_TEST_POSTGRES_URL not set (run .ci/postgres.sh and export its output)"
        )
    from dagster import DagsterInstance, EventLogEntry
    from dagster_postgres import PostgresRunStorage

    url = sa.engine.make_url(server)
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    name = f"dagster_deploy_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        # psycopg2, as the file says: with SQLAlchemy 2.1 a bare postgresql:// is psycopg 3,
        # on which dagster-postgres fails to store events (its NOTIFY)
        dagster_url = url.set(drivername="postgresql+psycopg2", database=name)
        monkeypatch.setenv("DAGSTER_PG_URL", dagster_url.render_as_string(hide_password=False))
        home = tmp_path / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text(INSTANCE.read_text())
        with DagsterInstance.from_config(str(home)) as instance:
            assert isinstance(instance.run_storage, PostgresRunStorage)
            assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
            assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
            concurrency = instance.get_concurrency_config()
            assert concurrency.pool_config.default_pool_limit == 1
            assert concurrency.run_queue_config is not None
            assert concurrency.run_queue_config.tag_concurrency_limits[0]["key"] == FLOW_TAG
            assert instance.run_retries_enabled and instance.run_retries_max_retries == 1
            assert instance.run_monitoring_enabled
            assert instance.run_monitoring_max_resume_run_attempts == 0
            assert instance.get_runs() == []
            run_id = uuid.uuid4().hex
            instance.store_event(
                EventLogEntry(
                    error_info=None,
                    level=logging.INFO,
                    user_message="stored through deploy/dagster.yaml",
                    run_id=run_id,
                    timestamp=time.time(),
                )
            )
            (stored,) = instance.all_logs(run_id)
            assert stored.user_message == "stored through deploy/dagster.yaml"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# -- the Helm values ------------------------------------------------------------------------------
def helm_values() -> dict[str, Any]:
    return yaml.safe_load(HELM_VALUES.read_text())


def documented_secrets() -> dict[str, set[str]]:
    """The Kubernetes Secrets the values' header says to create, with their keys
    (``kubectl create secret generic NAME --from-literal=KEY=...``)."""
    secrets: dict[str, set[str]] = {}
    current = None
    for line in HELM_VALUES.read_text().splitlines():
        if not line.startswith("#"):
            continue
        if m := re.search(r"create secret generic (\S+)", line):
            current = secrets.setdefault(m.group(1), set())
        for key in re.findall(r"--from-literal=([A-Za-z0-9_.-]+)=", line):
            assert current is not None
            current.add(key)
    return secrets


def test_helm_values_name_the_image_and_the_code_location() -> None:
    deployments = helm_values()["dagster-user-deployments"]
    assert deployments["enabled"] is True
    (deployment,) = deployments["deployments"]
    assert deployment["image"]["repository"] and deployment["image"]["tag"]
    args = deployment.get("codeServerArgs") or deployment["dagsterApiGrpcArgs"]
    assert args[args.index("-m") + 1] == MODULE
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True  # runs get the same
    assert helm_values()["runLauncher"]["type"] == "K8sRunLauncher"


def test_helm_values_give_every_secret_to_the_code_server_only() -> None:
    values = helm_values()
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    secrets = documented_secrets()
    wired = {s["name"] for s in deployment["envSecrets"]}
    assert wired, "the code server takes no Kubernetes Secret"
    assert wired <= set(secrets), "a Secret the deployment uses is not documented"
    provided = set().union(*(secrets[name] for name in wired))
    missing = [name for name in SECRET_VARIABLES if name not in provided]
    assert not missing, f"secrets the code reads but the Helm values do not provide: {missing}"
    # secrets never as plain values; each CRM's address as plain configuration
    plain = deployment.get("env") or {}
    assert not set(plain) & set(SECRET_VARIABLES)
    assert not [b for b in BASE_URL_VARIABLES if b not in plain]
    # the webserver and the daemon run no project code: none of it reaches them
    for section in ("dagsterWebserver", "dagsterDaemon"):
        part = values.get(section) or {}
        text = yaml.safe_dump(part)
        assert not [name for name in SECRET_VARIABLES if name in text], section
        assert not {s["name"] for s in part.get("envSecrets") or []} & wired, section
    # the Dagster database password from its own Secret, never in the values
    assert values["generatePostgresqlPasswordSecret"] is False
    assert values["global"]["postgresqlSecretName"] in secrets
    assert "postgresqlPassword" not in values["postgresql"]
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    text = HELM_VALUES.read_text()
    assert_no_password(text)
    for name in SECRET_VARIABLES:
        if DEFAULTS.get(name):
            assert DEFAULTS[name] not in text


def test_helm_values_repeat_the_instance_choices(tmp_path: Path) -> None:
    """The chart writes its own instance file: the same queue, pools and retries."""
    values, instance = helm_values(), load_instance_config(tmp_path)
    concurrency = values["concurrency"]
    assert concurrency["enabled"] is True
    assert (
        concurrency["runs"]["tagConcurrencyLimits"]
        == (instance["concurrency"]["runs"]["tag_concurrency_limits"])
    )
    pools = instance["concurrency"]["pools"]
    assert concurrency["pools"]["defaultLimit"] == pools["default_limit"]
    assert concurrency["pools"]["granularity"] == pools["granularity"]
    # the coordinator itself carries no limit (Dagster refuses them in both places)
    coordinator = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert not [v for v in coordinator.values() if v not in (None, False, [])]
    daemon = values["dagsterDaemon"]
    assert daemon["runRetries"]["enabled"] is True
    assert daemon["runRetries"]["maxRetries"] == instance["run_retries"]["max_retries"]
    assert (
        daemon["runRetries"]["retryOnAssetOrOpFailure"]
        is (instance["run_retries"]["retry_on_asset_or_op_failure"])
    )
    assert daemon["runMonitoring"]["enabled"] is True
    assert daemon["runMonitoring"]["maxResumeRunAttempts"] == 0
    assert values["telemetry"] == {"enabled": False}
    # a retry waits out the dead run's lease
    env = values["dagster-user-deployments"]["deployments"][0]["env"]
    assert float(env["CRM_SYNC_LEASE_WAIT"]) > float(env["CRM_SYNC_LEASE_TTL"])
