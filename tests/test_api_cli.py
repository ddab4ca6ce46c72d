"""`python run_demo.py serve` as a real process: arguments, the token, the journal, and a clean stop on a signal."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from actorflow.cli.serve import build_parser, exposure_warning, resolve_token

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 20.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


_LISTENING = re.compile(rb"running on http://127\.0\.0\.1:(\d+)")


class Served:
    """A `run_demo.py serve` process on a port of the system's choosing, and a client for it.

    The server's output is copied to `log` by a reader thread, which also reads the port from
    the server's "running on http://127.0.0.1:PORT" line: that line is printed once the server
    listens, so waiting for it is all the start-up synchronisation needed.
    """

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.log = log
        self._listening = threading.Event()
        self._port = 0
        self._lines: list[bytes] = []
        self._more = threading.Condition()
        self.process = subprocess.Popen(  # the interpreter running the tests, on the repo's run_demo.py
            [sys.executable, str(ROOT / "run_demo.py"), "serve", "--port", "0", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )
        self._reader = threading.Thread(target=self._copy_output, name="served-output", daemon=True)
        self._reader.start()
        if not self._listening.wait(WAIT_S) or not self._port:
            self.close()
            pytest.fail(f"the server did not start listening within {WAIT_S} s:\n{log.read_text()}")
        self.port = self._port
        self.url = f"http://127.0.0.1:{self.port}"

    def _copy_output(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout, self.log.open("ab") as sink:
            for line in self.process.stdout:
                sink.write(line)
                sink.flush()
                with self._more:
                    self._lines.append(line)
                    self._more.notify_all()
                if not self._listening.is_set() and (found := _LISTENING.search(line)):
                    self._port = int(found.group(1))
                    self._listening.set()
        self._listening.set()  # the output ended (the process exited): stop waiting for the line
        with self._more:
            self._lines.append(b"")  # the end of the output
            self._more.notify_all()

    def wait_for_line(self, pattern: bytes, timeout: float = WAIT_S) -> bool:
        """Block until the server has printed a line matching `pattern`; False if it did not (or exited)."""
        found = re.compile(pattern)
        with self._more:
            return self._more.wait_for(
                lambda: any(found.search(line) for line in self._lines) or b"" in self._lines, timeout
            ) and any(found.search(line) for line in self._lines)

    def stop(self, sig: signal.Signals = signal.SIGINT) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(timeout=WAIT_S)
        self._reader.join(WAIT_S)  # every line is in the log once the process has exited
        return code

    def close(self) -> None:
        """Kill the server if it still runs, and reap it and its reader."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=WAIT_S)
        self._reader.join(WAIT_S)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Served:
        served = Served(list(args), tmp_path / f"serve-{len(started)}.log", env)
        started.append(served)
        return served

    yield start
    for served in started:
        served.close()


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "run_demo.py"), "serve", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )


def test_the_serve_command_defaults_to_loopback_on_port_8080_without_a_token() -> None:
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.journal, args.token) == ("127.0.0.1", 8080, None, None)


def test_a_posted_task_completes_and_sigint_stops_the_server_cleanly_with_an_event_stream_open(
    serve: Callable[..., Served],
) -> None:
    served = serve()
    lines: list[str] = []
    stream_opened = threading.Event()
    stream_ended = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", f"{served.url}/events", timeout=WAIT_S) as stream:
            for line in stream.iter_lines():
                lines.append(line)
                stream_opened.set()  # the server's first frame: the stream is attached
        stream_ended.set()

    listener = threading.Thread(target=listen)
    listener.start()
    assert stream_opened.wait(WAIT_S), "the event stream never opened"
    created = httpx.post(  # as `curl --json` sends it
        f"{served.url}/tasks", content=b'{"name":"a","data":1}', headers={"Content-Type": "application/json"}
    )
    assert created.status_code == 201
    task_id = created.json()["task_id"]
    record = httpx.get(f"{served.url}/tasks/{task_id}", params={"wait": WAIT_S}, timeout=WAIT_S + 5).json()
    assert record["state"] == "COMPLETED", record

    assert served.stop(signal.SIGINT) == 0
    listener.join(WAIT_S)
    assert stream_ended.is_set()
    transitions = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    assert ("PROCESSING", "COMPLETED") in {(t["from_state"], t["to_state"]) for t in transitions}


def test_sigterm_lets_the_tasks_in_flight_finish_before_the_process_exits(
    serve: Callable[..., Served], tmp_path: Path
) -> None:
    journal = tmp_path / "tasks.db"
    served = serve("--journal", str(journal))
    slow = {"name": "slow", "data": {"sleep_ms": 300}}
    task_id = httpx.post(f"{served.url}/tasks", json=slow).json()["task_id"]

    assert served.stop(signal.SIGTERM) == 0
    exited_at = time.time()

    again = serve("--journal", str(journal))
    record = httpx.get(f"{again.url}/tasks/{task_id}").json()
    assert record["state"] == "COMPLETED"
    assert record["updated_at"] < exited_at  # finished by the first process, not recovered by the second


def test_allowed_hosts_are_repeatable_and_a_malformed_one_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["--allowed-host", "tasks.example.com", "--allowed-host", "[::1]:8443"])
    assert args.allowed_host == ["tasks.example.com", "[::1]:8443"]
    assert build_parser().parse_args([]).allowed_host == []

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--allowed-host", "http://tasks.example.com/"])
    assert "--allowed-host: must be a host name" in capsys.readouterr().err


STOP_APP = """
from actorflow import Runtime, RuntimeConfig

def make_runtime():
    return Runtime(RuntimeConfig(drain_timeout_s=%s, journal_path=%r))
"""


def stop_app(tmp_path: Path, drain_timeout_s: float) -> dict[str, str]:
    """A module `stopapp` whose runtime drains for `drain_timeout_s` at most; the env that imports it."""
    (tmp_path / "stopapp.py").write_text(STOP_APP % (drain_timeout_s, str(tmp_path / "tasks.db")))
    return {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length, read off `sock`."""
    reader = sock.makefile("rb")
    status = int(reader.readline().split()[1])
    headers = {}
    while (line := reader.readline().strip()) != b"":
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, reader.read(int(headers["content-length"]))


@pytest.mark.timeout(60)
def test_sigterm_answers_an_open_long_poll_with_json_503_and_stops_within_the_drain_timeout(tmp_path: Path) -> None:
    drain_s = 4.0
    served = Served(["--app", "stopapp:make_runtime"], tmp_path / "serve.log", env=stop_app(tmp_path, drain_s))
    try:
        slow = {"name": "slow", "data": {"sleep_ms": 60_000}}  # outlasts the drain: the stop must not wait for it
        task_id = httpx.post(f"{served.url}/tasks", json=slow, timeout=WAIT_S).json()["task_id"]
        with socket.create_connection(("127.0.0.1", served.port), timeout=WAIT_S) as sock:
            # Pipelined behind /healthz: once its answer is read, the long poll is a request in progress.
            host = f"Host: 127.0.0.1:{served.port}\r\n"
            sock.sendall(
                f"GET /healthz HTTP/1.1\r\n{host}\r\nGET /tasks/{task_id}?wait=60 HTTP/1.1\r\n{host}\r\n".encode()
            )
            assert read_response(sock)[0] == 200
            stopped_at = time.monotonic()
            served.process.send_signal(signal.SIGTERM)

            status, headers, body = read_response(sock)
            answered_s = time.monotonic() - stopped_at
        code = served.process.wait(timeout=WAIT_S + drain_s)
        exited_s = time.monotonic() - stopped_at
    finally:
        served.close()

    assert status == 503
    assert headers["content-type"] == "application/json"
    assert headers["retry-after"]
    assert "shutting down" in json.loads(body)["error"]
    assert answered_s < 2.0, f"the long poll was answered {answered_s:.1f} s after SIGTERM"
    assert code == 0
    assert exited_s < drain_s + 2.0, f"the stop took {exited_s:.1f} s, with a drain timeout of {drain_s} s"
    log = served.log.read_text()
    assert "Traceback" not in log
    assert "CancelledError" not in log


@pytest.mark.timeout(60)
def test_a_second_ctrl_c_stops_without_draining_and_says_so_without_a_traceback(tmp_path: Path) -> None:
    served = Served(["--app", "stopapp:make_runtime"], tmp_path / "serve.log", env=stop_app(tmp_path, 30.0))
    try:
        slow = {"name": "slow", "data": {"sleep_ms": 60_000}}
        assert httpx.post(f"{served.url}/tasks", json=slow, timeout=WAIT_S).status_code == 201
        served.process.send_signal(signal.SIGINT)
        assert served.wait_for_line(rb"Waiting up to \d+ s for 1 task"), served.log.read_text()
        again_at = time.monotonic()
        served.process.send_signal(signal.SIGINT)
        code = served.process.wait(timeout=WAIT_S)
        exited_s = time.monotonic() - again_at
    finally:
        served.close()

    log = served.log.read_text()
    assert code == 0
    assert exited_s < 5.0
    assert "Stopping without draining" in log
    assert "resume" in log  # with a journal, the unfinished task resumes at the next start
    assert "Traceback" not in log
    assert "KeyboardInterrupt" not in log


def test_the_token_comes_from_the_flag_first_then_the_environment() -> None:
    assert resolve_token("flag", {"ACTORFLOW_TOKEN": "env"}) == "flag"
    assert resolve_token(None, {"ACTORFLOW_TOKEN": "env"}) == "env"
    assert resolve_token(None, {}) is None
    with pytest.raises(ValueError, match="ACTORFLOW_TOKEN is blank"):
        resolve_token(None, {"ACTORFLOW_TOKEN": " "})
    with pytest.raises(ValueError, match="--token is blank"):
        resolve_token("", {})


def test_a_token_from_the_environment_protects_the_server_and_stays_out_of_the_access_log(
    serve: Callable[..., Served],
) -> None:
    served = serve(env={"ACTORFLOW_TOKEN": "very-secret"})

    assert httpx.get(f"{served.url}/stats").status_code == 401
    assert httpx.get(f"{served.url}/stats", headers={"Authorization": "Bearer very-secret"}).status_code == 200
    assert httpx.get(f"{served.url}/?token=very-secret").status_code == 200
    assert served.stop() == 0

    log = served.log.read_text()
    assert "GET /?token=*** HTTP/1.1" in log
    assert "very-secret" not in log


def test_a_file_that_is_not_a_journal_is_refused_with_a_one_line_error(tmp_path: Path) -> None:
    not_a_journal = tmp_path / "notes.txt"
    not_a_journal.write_text("these are not the tasks you are looking for\n" * 100)

    result = run_serve("--journal", str(not_a_journal), "--port", str(free_port()))

    assert result.returncode == 1
    assert "error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_only_a_non_loopback_host_without_a_token_is_warned_about() -> None:
    warning = exposure_warning("0.0.0.0", None)

    assert warning is not None
    assert "no token" in warning
    assert exposure_warning("0.0.0.0", "t") is None
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("::1", None) is None


def test_a_bad_port_is_refused_with_a_usage_error(tmp_path: Path) -> None:
    result = run_serve("--port", "70000")

    assert result.returncode == 2
    assert "--port must be from 0 to 65535" in result.stderr


def test_the_command_line_defaults_are_the_apis_own() -> None:
    from actorflow.api import server as api_server  # noqa: PLC0415 - the CLI module avoids importing it early
    from actorflow.cli import serve as cli  # noqa: PLC0415

    assert cli.SERVE_MAX_IN_FLIGHT == api_server.SERVE_MAX_IN_FLIGHT
    assert cli.SERVE_RETAIN_TERMINAL == api_server.SERVE_RETAIN_TERMINAL
    assert cli.MAX_PAYLOAD_BYTES == api_server.MAX_PAYLOAD_BYTES
    assert cli.MAX_PAYLOAD_NODES == api_server.MAX_PAYLOAD_NODES


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.fail("no VmRSS in /proc")


@pytest.mark.timeout(120)
def test_thirty_one_mib_posts_of_empty_objects_leave_the_servers_memory_bounded(serve: Callable[..., Served]) -> None:
    served = serve()
    body = b'{"data":[' + b",".join([b"{}"] * 262_000) + b"]}"
    with httpx.Client(base_url=served.url, timeout=WAIT_S) as http:
        assert http.post("/tasks", json={"name": "warm-up", "data": 1}).status_code == 201
        before = resident_mib(served.process.pid)

        json_body = {"Content-Type": "application/json"}
        statuses = {http.post("/tasks", content=body, headers=json_body).status_code for _ in range(30)}

        after = resident_mib(served.process.pid)
    assert statuses == {413}
    assert after - before < 100, f"RSS went from {before:.0f} MiB to {after:.0f} MiB"


def test_serve_at_its_max_in_flight_answers_503_overloaded_with_retry_after(serve: Callable[..., Served]) -> None:
    served = serve("--max-in-flight", "1")
    with httpx.Client(base_url=served.url, timeout=WAIT_S) as http:
        assert http.post("/tasks", json={"name": "slow", "data": {"sleep_ms": 30_000}}).status_code == 201

        refused = http.post("/tasks", json={"name": "next", "data": 1})

    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "overloaded" in refused.json()["error"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-in-flight", "0"], "--max-in-flight: must be an integer >= 1, got '0'"),
        (["--retain-terminal", "-1"], "--retain-terminal: must be an integer >= 0, got '-1'"),
        (["--max-payload-nodes", "many"], "--max-payload-nodes: must be an integer >= 1, got 'many'"),
        (["--app", "x:y", "--max-in-flight", "5"], "--max-in-flight and --app exclude each other"),
    ],
)
def test_bad_memory_bounds_are_refused_with_a_usage_error(args: list[str], message: str) -> None:
    result = run_serve(*args, "--port", str(free_port()))

    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_post_retried_after_the_server_is_killed_gets_the_first_task_back_and_no_duplicate(
    serve: Callable[..., Served], tmp_path: Path
) -> None:
    journal = str(tmp_path / "tasks.db")
    first = serve("--journal", journal)
    task = {"name": "once", "data": 1}
    created = [
        httpx.post(f"{first.url}/tasks", json=task, headers={"Idempotency-Key": f"order-{i}"}) for i in range(20)
    ]
    assert {response.status_code for response in created} == {201}
    first.process.kill()  # SIGKILL: nothing is flushed or closed
    assert first.process.wait(timeout=WAIT_S) == -signal.SIGKILL

    second = serve("--journal", journal)
    retried = [
        httpx.post(f"{second.url}/tasks", json=task, headers={"Idempotency-Key": f"order-{i}"}) for i in range(20)
    ]
    listed = httpx.get(f"{second.url}/tasks", params={"limit": 1000}).json()["tasks"]

    assert [r.json()["task_id"] for r in retried] == [r.json()["task_id"] for r in created]
    assert {r.headers.get("idempotent-replayed") for r in retried} == {"true"}
    assert len(listed) == 20
