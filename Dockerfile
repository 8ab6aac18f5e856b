# The code-server image: the crm_assets code location, served over gRPC on port 4000.
# On Kubernetes the same image also runs each sync run (one pod per run, deploy/helm).
#
#   docker build -t crm-assets:<git-sha> .
#
# It installs exactly what `make install` installs (the pinned lock file, then the project
# without dependencies; crm_assets_tests/test_deploy_files.py keeps the two in step).
# No secret is baked in: CRM credentials, CRM_SYNC_STATE_URL and the Dagster database
# reach the container as environment variables at run time (docs/deploy.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /opt/crm_assets

# dependencies first (their layer is rebuilt only when the lock file changes);
# the uv version is the Makefile's UV_VERSION
COPY requirements.lock ./
RUN python -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install -q uv==0.13.9 \
    && /opt/venv/bin/uv pip sync -q --python /opt/venv/bin/python requirements.lock

# then the project itself, without dependencies (a regular install, not editable)
COPY pyproject.toml README.md ./
COPY crm_assets ./crm_assets
RUN /opt/venv/bin/uv pip install -q --python /opt/venv/bin/python --no-deps . \
    && rm -rf /root/.cache

# an unprivileged user; the data directory is where snapshots, plans and reports go
# (mount a volume shared by the code server and the run pods there, docs/deploy.md)
RUN useradd --create-home --uid 10001 --user-group crm \
    && mkdir -p /var/lib/crm_sync /opt/dagster/dagster_home \
    && chown crm:crm /var/lib/crm_sync /opt/dagster/dagster_home
ENV CRM_SYNC_DATA_DIR=/var/lib/crm_sync \
    DAGSTER_HOME=/opt/dagster/dagster_home
USER crm

EXPOSE 4000
# CMD, not ENTRYPOINT: Dagster's Helm chart starts the code server and the K8sRunLauncher
# starts each run (`dagster api execute_run ...`) by giving the whole command as container
# args, which replace CMD but would be appended to an ENTRYPOINT.
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "crm_assets.definitions"]
