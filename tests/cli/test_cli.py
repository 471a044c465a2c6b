"""The operator interface (SPEC §7), driven as a script or a person would: real subprocesses."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

OPENSEQUENCE = [sys.executable, "-m", "opensequence"]


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OPENSEQUENCE, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def env(database_url: str, tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENSEQUENCE_")}
    return {
        **clean,
        "OPENSEQUENCE_DATABASE_URL": database_url,
        "OPENSEQUENCE_MAIL_URL": f"maildir://{tmp_path / 'outbox'}",
    }


def test_keys_create_list_revoke(env: dict[str, str], tmp_path: Path) -> None:
    created = run_cli(["keys", "create", "--org", "acme", "--json"], env, tmp_path)
    assert created.returncode == 0, created.stderr
    body = json.loads(created.stdout)
    assert set(body) == {"org_id", "key_id", "key"}
    scoped = run_cli(
        [
            "keys",
            "create",
            "--org",
            "acme",
            "--scope",
            "contacts:read",
            "--scope",
            "sequences:read",
        ],
        env,
        tmp_path,
    )
    assert scoped.returncode == 0, scoped.stderr
    assert scoped.stdout.strip().startswith("osk_")

    listed = run_cli(["keys", "list", "--org", "acme", "--json"], env, tmp_path)
    keys = json.loads(listed.stdout)
    assert [k["scopes"] for k in keys] == [["*"], ["contacts:read", "sequences:read"]]
    assert keys[0]["key_id"] == body["key_id"]
    assert body["key"].startswith(keys[0]["prefix"])
    assert all(k["revoked_at"] is None for k in keys)
    assert "osk_" not in listed.stdout.replace(keys[0]["prefix"], "").replace(keys[1]["prefix"], "")

    revoked = run_cli(["keys", "revoke", body["key_id"]], env, tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    keys = json.loads(run_cli(["keys", "list", "--org", "acme", "--json"], env, tmp_path).stdout)
    assert keys[0]["revoked_at"] is not None and keys[0]["revoked_at"].endswith("Z")


def test_usage_and_config_errors_exit_2_with_one_line(env: dict[str, str], tmp_path: Path) -> None:
    bad_env = run_cli(
        ["keys", "list", "--org", "x"], {**env, "OPENSEQUENCE_DATABASE_URL": "mysql://x"}, tmp_path
    )
    assert bad_env.returncode == 2
    assert bad_env.stderr.strip().count("\n") == 0
    assert "OPENSEQUENCE_DATABASE_URL" in bad_env.stderr
    bad_rate = run_cli(
        ["keys", "list", "--org", "x"], {**env, "OPENSEQUENCE_RATE_LIMIT": "lots"}, tmp_path
    )
    assert bad_rate.returncode == 2 and "OPENSEQUENCE_RATE_LIMIT" in bad_rate.stderr
    bad_public = run_cli(
        ["keys", "list", "--org", "x"],
        {**env, "OPENSEQUENCE_PUBLIC_URL": "mail.acme.test"},
        tmp_path,
    )
    assert bad_public.returncode == 2 and "OPENSEQUENCE_PUBLIC_URL" in bad_public.stderr
    assert "http:// or https://" in bad_public.stderr
    # serve started with its worker dead on arrival (no log until shutdown); worker said so.
    for command in (["serve", "--port", str(_free_port())], ["worker"]):
        for url in ("bogus://x", "smtp://mail.example?tsl=starttls"):
            bad_mail = run_cli(command, {**env, "OPENSEQUENCE_MAIL_URL": url}, tmp_path)
            assert bad_mail.returncode == 2, (command, bad_mail.stderr)
            assert bad_mail.stderr.strip().count("\n") == 0
            assert "OPENSEQUENCE_MAIL_URL" in bad_mail.stderr
    # A database that cannot be opened printed a ~140-line traceback and exited 1.
    for url in (
        f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'db.sqlite'}",
        f"postgresql://postgres@127.0.0.1:{_free_port()}/x",
    ):
        unopened = run_cli(
            ["keys", "list", "--org", "x"], {**env, "OPENSEQUENCE_DATABASE_URL": url}, tmp_path
        )
        assert unopened.returncode == 2, unopened.stderr
        assert unopened.stderr.strip().count("\n") == 0
        assert "OPENSEQUENCE_DATABASE_URL: cannot open the database" in unopened.stderr
    bad_id = run_cli(["keys", "revoke", "nope"], env, tmp_path)
    assert bad_id.returncode == 2 and "KEY_ID" in bad_id.stderr


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["keys", "create"], "--org"),
        (["worker", "--concurrency", "0"], "--concurrency"),
        (["keys", "list", "--org", "x", "--bogus"], "--bogus"),
    ],
)
def test_a_usage_error_is_one_line_naming_the_flag(
    args: list[str], flag: str, env: dict[str, str], tmp_path: Path
) -> None:
    """SPEC §7: exit 2 with a one-line message naming the flag. Typer's own form was five
    lines, the message boxed between the usage and the rules."""
    result = run_cli(args, env, tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and flag in line


def test_arguments_the_database_refuses_exit_2_naming_the_flag(
    env: dict[str, str], tmp_path: Path
) -> None:
    """They exited 1 with a message that named no flag."""
    unknown_key = str(uuid.uuid4())
    for args, line in (
        (
            ["keys", "create", "--org", "x", "--scope", "contacts:read", "--scope", "root"],
            "--scope: unknown scope 'root'; expected one of sequences:read, sequences:write, "
            "contacts:read, contacts:write",
        ),
        (["keys", "create", "--org", " "], "--org: organization name must not be empty"),
        (
            ["keys", "create", "--org", "x" * 257],
            "--org: organization name must be at most 256 characters",
        ),
        (["keys", "list", "--org", "x"], "--org: organization 'x' does not exist"),
        (["keys", "revoke", unknown_key], f"KEY_ID: API key {unknown_key} does not exist"),
    ):
        refused = run_cli(args, env, tmp_path)
        assert (refused.returncode, refused.stderr) == (2, f"error: {line}\n"), args
        assert refused.stdout == ""


def test_a_redis_url_that_builds_no_storage_is_one_line_and_exit_2(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The rate-limit storage is built at the app's startup: serve printed its key and
    `listening`, then a ~70-line traceback, and exited 3; api likewise, without the key."""
    for command, url in (
        (["serve", "--port", str(_free_port())], "notaurl"),
        (["api", "--port", str(_free_port())], "notaurl"),
        (["serve", "--port", str(_free_port())], "redis://cache:port/0"),
        (["api", "--port", str(_free_port())], "unix://redis.sock"),  # a host, not a path
    ):
        bad = run_cli(command, {**env, "OPENSEQUENCE_REDIS_URL": url}, tmp_path)
        assert bad.returncode == 2, (command, url, bad.stderr)
        assert bad.stderr.strip().count("\n") == 0, bad.stderr
        assert bad.stderr.startswith("error: OPENSEQUENCE_REDIS_URL: "), bad.stderr
        assert bad.stdout == ""


def test_a_busy_metrics_port_is_one_line_and_exit_2(env: dict[str, str], tmp_path: Path) -> None:
    """It was a traceback ending in `OSError: [Errno 98] Address already in use`, exit 1."""
    with _listening_socket() as taken:
        port = taken.getsockname()[1]
        busy = run_cli(["worker", "--metrics-port", str(port)], env, tmp_path)
    assert busy.returncode == 2, busy.stderr
    assert busy.stderr.strip().count("\n") == 0, busy.stderr
    assert busy.stderr.startswith(f"error: --metrics-port: cannot listen on 127.0.0.1:{port}: ")


def test_a_port_that_cannot_be_bound_is_one_line_and_exit_2(
    env: dict[str, str], tmp_path: Path
) -> None:
    """serve printed its key and `listening`, started its app and worker, then logged the bind
    error and exited 3; api likewise, without the lines on stdout."""
    with _listening_socket() as taken:
        port = taken.getsockname()[1]
        for command in ("serve", "api"):
            busy = run_cli([command, "--port", str(port)], env, tmp_path)
            assert busy.returncode == 2, (command, busy.stderr)
            assert busy.stderr.strip().count("\n") == 0, busy.stderr
            assert busy.stderr.startswith(f"error: --port: cannot listen on 127.0.0.1:{port}: ")
            assert busy.stdout == ""
    elsewhere = run_cli(["serve", "--host", "192.0.2.1", "--port", str(port)], env, tmp_path)
    assert elsewhere.returncode == 2, elsewhere.stderr
    assert elsewhere.stderr.strip().count("\n") == 0, elsewhere.stderr
    assert elsewhere.stderr.startswith(f"error: --host: cannot listen on 192.0.2.1:{port}: ")


def _listening_socket() -> socket.socket:
    """A port someone else is listening on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _started(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """A long-running command, its stdout read by the test."""
    return subprocess.Popen(
        [*OPENSEQUENCE, *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def test_serve_prints_one_working_key_once(env: dict[str, str], tmp_path: Path) -> None:
    port = _free_port()
    lines: list[str] = []
    for attempt in range(2):
        with _started(["serve", "--port", str(port)], env, tmp_path) as process:
            _check_serve(process, port, lines)
        assert process.returncode == 0  # SIGTERM: a graceful stop, exit 0 (it was 143)
        assert attempt == 0 or sum("API key: " in line for line in lines) == 1


def _check_serve(process: subprocess.Popen[str], port: int, lines: list[str]) -> None:
    try:
        assert process.stdout is not None
        listening = ""
        while "listening" not in listening:
            listening = process.stdout.readline()
            assert listening, "serve exited early"
            lines.append(listening)
        # Printed once it listens (it was printed before uvicorn had even started).
        health = httpx.get(f"http://127.0.0.1:{port}/healthz")
        assert health.status_code == 200
        keys = [line.split("API key: ", 1)[1].strip() for line in lines if "API key: " in line]
        assert len(keys) == 1, lines  # printed on the first start only
        me = httpx.get(
            f"http://127.0.0.1:{port}/me", headers={"Authorization": f"Bearer {keys[0]}"}
        )
        assert me.status_code == 200, me.text
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize(
    ("workers", "host", "shown", "stop"),
    [
        (1, "127.0.0.1", "127.0.0.1", "SIGTERM"),
        (2, "127.0.0.1", "127.0.0.1", "SIGTERM"),
        (2, "", "0.0.0.0", "SIGTERM"),
        (2, "127.0.0.1", "127.0.0.1", "SIGINT"),
    ],
)
def test_api_prints_its_listening_line_once_it_answers(
    env: dict[str, str], tmp_path: Path, workers: int, host: str, shown: str, stop: str
) -> None:
    """`api` said nothing on stdout (uvicorn's log line only): a script could not tell when it
    served. Its line comes once a request is answered, with one process or several, on one
    interface or all (``--host ""``). SIGTERM or SIGINT then ends it with exit 0 (with several
    processes, a stop the command tells from a process that failed to start)."""
    port = _free_port()
    command = ["api", "--host", host, "--port", str(port), "--workers", str(workers)]
    with _started(command, env, tmp_path) as process:
        try:
            assert process.stdout is not None
            # Within a minute, rather than waiting for good on a line that never comes.
            readable, _, _ = select.select([process.stdout], [], [], 60)
            assert readable, "no line on stdout within 60 s"
            line = process.stdout.readline()
            assert line.startswith(f"OpenSequence API listening on http://{shown}:{port} "), line
            assert (f"{workers} processes" in line) == (workers > 1), line
            assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        finally:
            process.send_signal(getattr(signal, stop))
            rest, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "listening" not in rest  # once


# What a ``sitecustomize`` does in the processes `api --workers N` starts (and not in the
# command itself): the app cannot be imported (as when the package was replaced on disk), or
# cannot be built (its settings are bad there).
_IN_THE_PROCESSES = {
    "import": "sys.modules['opensequence.api.app'] = None",
    "build": "os.environ['OPENSEQUENCE_RATE_LIMIT'] = 'lots'",
}


@pytest.mark.parametrize("failure", sorted(_IN_THE_PROCESSES))
def test_api_workers_that_fail_to_start_end_it_with_exit_3(
    env: dict[str, str], tmp_path: Path, failure: str
) -> None:
    """With ``--workers N`` uvicorn's supervisor stops once a process fails to start and returns
    as if told to stop: `api` ended with exit 0, and a service manager took the failure for a
    clean stop. An app that raised while being built did not even count as failing to start:
    its process died, and was started again, and died, for as long as the command ran."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if '--multiprocessing-fork' in sys.orig_argv:\n"
        f"    {_IN_THE_PROCESSES[failure]}\n"
    )
    path = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    port = _free_port()
    command = ["api", "--port", str(port), "--workers", "2"]
    result = run_cli(command, {**env, "PYTHONPATH": path}, tmp_path)
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "listening" not in result.stdout
    assert "the app could not be built" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the API processes stopped: one failed to start"), last
