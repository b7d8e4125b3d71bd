"""fusionct on a real Prefect server backed by PostgreSQL (the README's department setup).

The test starts a throwaway PostgreSQL cluster (Debian's postgresql, as the ``postgres``
user when run as root) and ``prefect server start`` on it, both on free loopback ports;
serves the deployments with ``python -m flows.deploy``; launches an analysis from the
Prefect CLI (``prefect deployment run``), as staff would, and checks that the result was
written and that the flow run is recorded as COMPLETED in PostgreSQL; then runs
``fusionct serve`` with ``FUSIONCT_DEPLOYMENT`` so a study sent by storescu becomes a run of
the served deployment, recorded the same way. Everything started is stopped at the end.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from _proc import intake_finished, stop, wait_until  # noqa: E402  (tests/ is on sys.path under pytest)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path | None:
    """The PostgreSQL server binaries (Debian puts them in /usr/lib/postgresql/<v>/bin)."""
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(cand, "initdb").exists() and Path(cand, "pg_ctl").exists():
            return Path(cand)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port> with an empty ``prefect`` database."""
    binaries = pg_bin()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries not found: install Debian's postgresql "
                    "(.ci/setup does) to run the real-server test")
    as_root = os.geteuid() == 0
    if as_root and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
    try:
        import pwd

        pg_user = pwd.getpwnam("postgres") if as_root else None
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to own the cluster")

    root = Path(tempfile.mkdtemp(prefix="fusionct_pg_"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if as_root:
        os.chown(root, pg_user.pw_uid, pg_user.pw_gid)
        os.chown(sock, pg_user.pw_uid, pg_user.pw_gid)

    def run(*cmd, check=True, timeout=120):
        full = (["runuser", "-u", "postgres", "--"] if as_root else []) + [str(c) for c in cmd]
        return subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=check)

    port = free_port()
    run(binaries / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
        "--no-locale")
    run(binaries / "pg_ctl", "-D", data, "-l", root / "postgres.log", "-w", "-t", "60", "start",
        "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off")
    try:
        run(binaries / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "prefect")
        yield {"port": port, "url": f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect",
               "dsn": f"host=127.0.0.1 port={port} user=postgres dbname=prefect"}
    finally:
        run(binaries / "pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "60", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def prefect_server(postgres, tmp_path_factory):
    """``prefect server start`` on PostgreSQL at a free loopback port; yields its environment."""
    home = tmp_path_factory.mktemp("prefect_home")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ,
           "PREFECT_HOME": str(home),
           "PREFECT_API_DATABASE_CONNECTION_URL": postgres["url"],
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home,
                            start_new_session=True)
    try:
        if not wait_until(lambda: _healthy(api_url) or proc.poll() is not None, 120):
            pytest.fail("Prefect server did not become healthy:\n" + (home / "server.log").read_text()[-3000:])
        assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
        client_env = {**env, "PREFECT_API_URL": api_url}
        client_env.pop("PREFECT_API_DATABASE_CONNECTION_URL")
        yield {"api_url": api_url, "env": client_env, "home": home}
    finally:
        stop(proc, 30, group=True)
        log.close()


def _pipeline_ready() -> bool:
    try:
        from sample_data import PhantomSpec, write_dicom_study  # noqa: F401
        import pipeline.detect, pipeline.measure, pipeline.outputs  # noqa: F401,E401
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    if not _pipeline_ready():
        pytest.skip("pipeline.detect / pipeline.measure not importable yet")
    from sample_data import PhantomSpec, write_dicom_study

    study = tmp_path_factory.mktemp("pg_study") / "study"
    write_dicom_study(PhantomSpec(seed=3, spacing_mm=(0.8, 0.8, 1.5), vertebrae=("L4", "L5", "S1"),
                                  instrumented_levels=("L5-S1",)), study, extra_series=False)
    return study


@pytest.fixture(scope="module")
def served(prefect_server, small_study, tmp_path_factory):
    """``python -m flows.deploy`` serving the deployments against the PostgreSQL-backed server."""
    work = tmp_path_factory.mktemp("deploy")
    env = {**prefect_server["env"], "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "FUSIONCT_CACHE_DIR": str(work / "cache"), "PYTHONUNBUFFERED": "1"}
    log_path = work / "deploy.log"
    with open(log_path, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "flows.deploy", "--limit", "1"], cwd=REPO,
                                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def deployment_listed():
        url = f"{prefect_server['api_url']}/deployments/name/fusionct-analyze/analyze"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        assert wait_until(lambda: proc.poll() is not None or deployment_listed(), 120, 1.0), \
            log_path.read_text()[-3000:]
        assert proc.poll() is None, log_path.read_text()[-3000:]
        yield {"env": env, "log": log_path}
    finally:
        stop(proc, 30, group=True)


def flow_runs(dsn: str) -> list[tuple]:
    """(state, deployment name, flow run name, parameters) of every fusionct-analyze run in PostgreSQL."""
    import psycopg2

    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("""SELECT fr.state_type, d.name, fr.name, fr.parameters
                       FROM flow_run fr JOIN flow f ON f.id = fr.flow_id
                       LEFT JOIN deployment d ON d.id = fr.deployment_id
                       WHERE f.name = 'fusionct-analyze' ORDER BY fr.created""")
        return cur.fetchall()


def test_prefect_server_on_postgres_records_a_study_launched_from_the_cli(served, postgres, small_study,
                                                                         tmp_path):
    out = tmp_path / "results"
    t0 = time.perf_counter()
    launched = subprocess.run(
        [str(VENV_BIN / "prefect"), "deployment", "run", "fusionct-analyze/analyze",
         "--param", f"input_path={small_study}", "--param", f"outdir={out}",
         "--watch", "--watch-timeout", "600"],
        env=served["env"], capture_output=True, text=True, timeout=660)
    elapsed = time.perf_counter() - t0
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:] + \
        served["log"].read_text()[-3000:]
    doc = json.loads((out / "measurements.json").read_text())
    truth = json.loads((small_study / "truth.json").read_text())
    assert doc["input"]["study_instance_uid"] == truth["dicom"]["study_instance_uid"]

    runs = [r for r in flow_runs(postgres["dsn"]) if r[3].get("outdir") == str(out)]
    assert [(state, dep) for state, dep, _, _ in runs] == [("COMPLETED", "analyze")]
    assert runs[0][3]["input_path"] == str(small_study)
    print(f"\nCLI-launched analysis on the PostgreSQL-backed server: {elapsed:.1f} s")


def test_fusionct_serve_hands_a_received_study_to_the_served_deployment(served, postgres, small_study,
                                                                         tmp_path):
    if shutil.which("storescu") is None:
        pytest.skip("dcmtk's storescu is not installed (Debian package dcmtk)")
    truth = json.loads((small_study / "truth.json").read_text())
    uid = truth["dicom"]["study_instance_uid"]
    port, out = free_port(), tmp_path / "out"
    env = {**served["env"], "FUSIONCT_DEPLOYMENT": "fusionct-analyze/analyze"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(port),
                                 "--out-root", str(out), "--quiet-seconds", "1"], cwd=REPO, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_until(lambda: "serving" in log_path.read_text() or proc.poll() is not None, 120), \
            log_path.read_text()[-2000:]
        files = [str(p) for p in small_study.rglob("*") if p.is_file() and p.name != "truth.json"]
        sent = subprocess.run(["storescu", "-aec", "FUSIONCT", "127.0.0.1", str(port), *files],
                              capture_output=True, text=True, timeout=180)
        assert sent.returncode == 0, sent.stderr[-2000:]
        status_path = out / ".intake" / uid / "status.json"

        assert wait_until(lambda: intake_finished(status_path), 600, 0.5), log_path.read_text()[-3000:]
        status = json.loads(status_path.read_text())
        assert status["state"] == "done", status
        assert (out / uid / "measurements.json").exists()
        runs = [r for r in flow_runs(postgres["dsn"]) if r[2] == f"study-{uid}"]
        assert [(state, dep) for state, dep, _, _ in runs] == [("COMPLETED", "analyze")]
        assert runs[0][3]["outdir"] == str(out / uid)
    finally:
        stop(proc, 60, group=True)
