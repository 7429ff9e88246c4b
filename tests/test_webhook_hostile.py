"""The webhook against hostile clients, over real sockets: oversized and streamed bodies,
malformed requests and raw garbage, 200 requests at once, and slow or idle connections."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from flows.prefect_api import PrefectAPI
from flows.webhook import (
    HEAD_TIMEOUT_SECONDS,
    MAX_BODY_BYTES,
    MAX_CONNECTIONS,
    create_app,
    server_options,
)
from state.db import connect

pytestmark = pytest.mark.e2e
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """The app on a real uvicorn on loopback, with the webhook's own server options."""

    def __init__(self, app: Any, **options: Any) -> None:
        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                log_level="critical",
                **server_options(**options),
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "webhook did not start"
            time.sleep(0.05)
        self.client = httpx.Client(base_url=self.base_url, headers=AUTH, timeout=30)
        return self

    def __exit__(self, *_: object) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock


def _answer(sock: socket.socket, timeout: float = 5) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout`)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.fixture
def served(data_dir: Path, db: Path, linecount: Any) -> Iterator[Served]:
    """No Prefect server needed: nothing here gets as far as creating a run."""
    app = create_app(data_dir, db, token=TOKEN, prefect_url="http://127.0.0.1:9/api")
    with Served(app) as s:
        yield s


def _head(path: str, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n{extra}\r\n"
    ).encode()


# oversized bodies ---------------------------------------------------------------------------


def test_a_declared_10_mb_body_is_refused_at_once_unread(served: Served, db: Path) -> None:
    with served.connect() as sock:
        started = time.monotonic()
        sock.sendall(_head("/processors/linecount/runs", "Content-Length: 10485760\r\n"))
        sock.sendall(b"x" * 65536)  # a first piece; the other 9.9 MB are never sent
        answer = _answer(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"connection: close" in answer.lower()
    assert answer.endswith(b'{"detail":"Request body over 65536 bytes; no endpoint takes a body"}')
    assert elapsed < 2, elapsed  # answered, and the connection closed, without the body
    assert not db.exists()  # refused before the app: no trigger, so nothing audited either
    assert served.client.get("/health").status_code == 200


def test_a_10_mb_body_from_an_ordinary_client_is_cut_short(served: Served) -> None:
    """httpx writes the whole body before it reads: it gets the 413, or sees the connection
    closed under its upload; either way quickly, and the server never holds the body."""
    started = time.monotonic()
    try:
        response = served.client.post("/processors/linecount/runs", content=b"x" * (10 << 20))
        outcome: Any = response.status_code
    except httpx.TransportError as error:
        outcome = type(error).__name__
    elapsed = time.monotonic() - started
    assert outcome in (413, "WriteError", "ReadError", "RemoteProtocolError"), outcome
    assert elapsed < 5, elapsed
    assert served.client.get("/health").status_code == 200


def test_a_streamed_body_is_refused_when_it_passes_the_limit(served: Served) -> None:
    sent = 0

    def forever() -> Iterator[bytes]:  # chunked: no Content-Length to refuse it by
        nonlocal sent
        while sent < 50 << 20:
            sent += 4096
            yield b"y" * 4096

    started = time.monotonic()
    try:
        response = served.client.post("/processors/linecount/runs", content=forever())
        outcome: Any = response.status_code
    except httpx.TransportError as error:
        outcome = type(error).__name__
    elapsed = time.monotonic() - started
    assert outcome in (413, "WriteError", "ReadError", "RemoteProtocolError"), outcome
    assert sent < 10 << 20, sent  # stopped long before 50 MB (socket buffers hold the rest)
    assert elapsed < 5, elapsed
    with served.connect() as sock:  # a raw chunked body: the 413 comes with the 17th KB
        sock.sendall(_head("/processors/linecount/runs", "Transfer-Encoding: chunked\r\n"))
        for _ in range(MAX_BODY_BYTES // 1024 + 1):
            sock.sendall(b"400\r\n" + b"z" * 1024 + b"\r\n")
        assert _answer(sock).startswith(b"HTTP/1.1 413 ")


def test_a_small_body_is_still_fine(served: Served) -> None:
    response = served.client.post("/processors/nope/runs", content=b'{"why": "not"}')
    assert response.status_code == 400
    assert response.json()["detail"].startswith("Unknown processor 'nope'")


# malformed requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "detail"),
    [
        (
            "/processors/linecount/runs?wait=maybe",
            "query parameter 'wait': Input should be a valid boolean, unable to interpret input",
        ),
        (
            "/processors/linecount/runs?timeout=soon",
            "query parameter 'timeout': Input should be a valid number, unable to parse string "
            "as a number",
        ),
        ("/processors/linecount/runs?timeout=nan&wait=true", "query parameter 'timeout': "),
        ("/processors/linecount/runs?timeout=inf&wait=true", "query parameter 'timeout': "),
        ("/processors/linecount/runs?timeout=-1", "query parameter 'timeout': "),
        ("/processors/linecount/runs?timeout=0", "query parameter 'timeout': "),
        ("/processors/linecount/runs?timeout=1e12", "query parameter 'timeout': "),
        ("/api/admin/run-session-processor", "query parameter 'processor': Field required"),
        (
            "/api/admin/run-session-processor?processor=usage&wait=2",
            "query parameter 'wait': Input should be a valid boolean, unable to interpret input",
        ),
    ],
)
def test_bad_query_parameters_get_422_with_one_line(served: Served, path: str, detail: str) -> None:
    response = served.client.post(path)
    assert response.status_code == 422
    text = response.json()["detail"]
    assert isinstance(text, str) and "\n" not in text
    assert text.startswith(detail), text


def test_wrong_paths_methods_and_names_get_short_answers(served: Served) -> None:
    c = served.client
    assert c.get("/nope").status_code == 404
    assert c.post("/processors/linecount/runs/extra").status_code == 404
    assert c.get("/processors/linecount/runs").status_code == 405
    assert c.delete("/health").status_code == 405
    assert c.put("/api/admin/run-session-processor?processor=usage").status_code == 405
    for name in ("x" * 8000, "%00%ff", "..%2F..%2Fetc", "linecount%0D%0AX-Injected:%201", "💥"):
        response = c.post(f"/processors/{name}/runs")
        assert response.status_code in (400, 404), (name, response.status_code)
        assert "x-injected" not in response.headers
    assert c.get("/health").status_code == 200


GARBAGE = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),  # a TLS hello
    b"GARBAGE\r\n\r\n",
    b"\x00" * 100 + b"\r\n\r\n",
    b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n",
    b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 20000 + b"\r\n",
]


def _response_head(sock: socket.socket, timeout: float = 5) -> bytes:
    """The status line and headers of the server's answer (b"" if it only closed)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data.split(b"\r\n\r\n", 1)[0]


def test_garbage_over_a_raw_socket_gets_a_4xx_at_once_and_the_server_survives(
    served: Served,
) -> None:
    statuses = []
    for garbage in GARBAGE:
        with served.connect() as sock:
            started = time.monotonic()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(garbage)  # may be closed on us halfway: also an answer
            head = _response_head(sock)
            assert time.monotonic() - started < 3, garbage[:40]
        assert head.startswith(b"HTTP/1.1 4"), (garbage[:40], head[:200])
        statuses.append(head[9:12])
    # Measured (h11): all 400 but `HTTP/9.9`, which h11 takes as 1.1: a 401 without the
    # token. A 1 MB header or URL arrives in several reads, over h11's 16 KB bound: 400.
    assert statuses == [b"400"] * 3 + [b"401"] + [b"400"] * (len(GARBAGE) - 4), statuses
    assert served.client.get("/health").status_code == 200


# 200 requests at once --------------------------------------------------------------------------


def _deploy(name: str) -> str:
    from flows.processor_flow import build_flow

    return str(build_flow(name).to_deployment(name=name).apply())


def test_two_hundred_concurrent_requests_are_all_answered_and_make_one_run_per_processor(
    prefect_api: str, data_dir: Path, db: Path, linecount: Any
) -> None:
    deployments = {name: _deploy(name) for name in ("linecount", "usage")}
    app = create_app(data_dir, db, token=TOKEN, prefect_url=prefect_api)
    kinds = ["health", "processors", "linecount", "usage", "unknown"]
    start = threading.Barrier(200, timeout=60)

    def call(i: int) -> tuple[str, int, float, str]:
        kind = kinds[i % len(kinds)]
        with httpx.Client(base_url=served.base_url, headers=AUTH, timeout=120) as c:
            start.wait()
            began = time.monotonic()
            if kind in ("health", "processors"):
                response = c.get(f"/{kind}")
            elif kind == "usage":
                response = c.post("/api/admin/run-session-processor", params={"processor": "usage"})
            elif kind == "linecount":
                response = c.post("/processors/linecount/runs")
            else:
                response = c.post(f"/processors/nope{i}/runs")
            return kind, response.status_code, time.monotonic() - began, response.text[:300]

    try:
        with Served(app) as served, ThreadPoolExecutor(max_workers=200) as pool:
            began = time.monotonic()
            results = list(pool.map(call, range(200)))
            wall = time.monotonic() - began
        by_kind: dict[str, list[int]] = {k: [] for k in kinds}
        for kind, status, _, _ in results:
            by_kind[kind].append(status)
        # A 503 is allowed only as the documented "Prefect unreachable": the SQLite-backed test
        # server, hammered by 80 triggers at once, stays locked past our client's retries.
        unexpected = [
            r for r in results if r[1] >= 500 and not (r[1] == 503 and "Prefect API" in r[3])
        ]
        assert not unexpected, unexpected
        assert by_kind["health"] == [200] * 40 and by_kind["processors"] == [200] * 40
        assert by_kind["unknown"] == [400] * 40
        for name in ("linecount", "usage"):
            assert by_kind[name].count(202) == 1, (name, by_kind[name])
            assert set(by_kind[name]) <= {202, 409, 503}, (name, by_kind[name])
        with PrefectAPI(prefect_api) as api:
            for name, deployment_id in deployments.items():
                runs = api.flow_runs(deployment_ids=[deployment_id])
                assert len(runs) == 1, (name, runs)
        with connect(db, read_only=True) as con:
            audit = con.execute(
                "SELECT outcome, count(*) FROM trigger_audit GROUP BY 1 ORDER BY 1"
            ).fetchall()
        busy = sum(1 for r in results if r[1] == 503)
        assert audit == sorted(
            [("accepted", 2), ("conflict", 78 - busy), ("unknown", 40)]
            + ([("unavailable", busy)] if busy else [])
        )
        slowest = max(seconds for _, _, seconds, _ in results)
        assert wall < 90 and slowest < 90, (wall, slowest)
    finally:
        with PrefectAPI(prefect_api) as api:
            for deployment_id in deployments.values():
                for run in api.flow_runs(deployment_ids=[deployment_id]):
                    api.force_state(run["id"], "CANCELLED", "test cleanup")
                httpx.delete(f"{prefect_api}/deployments/{deployment_id}", timeout=30)


# slow and idle clients ---------------------------------------------------------------------------


def test_the_served_configuration_bounds_heads_and_connections() -> None:
    options = server_options()
    assert issubclass(options["http"], H11Protocol)
    assert options["limit_concurrency"] == MAX_CONNECTIONS
    assert HEAD_TIMEOUT_SECONDS <= 30


def test_slow_and_idle_clients_block_nobody_and_are_dropped(
    data_dir: Path, db: Path, linecount: Any
) -> None:
    app = create_app(
        data_dir, db, token=TOKEN, prefect_url="http://127.0.0.1:9/api", body_timeout=2
    )
    with Served(app, head_timeout=2) as served:
        opened = time.monotonic()
        idle = [served.connect() for _ in range(50)]
        slow_heads = [served.connect() for _ in range(5)]
        slow_body = served.connect()
        slow_body.sendall(_head("/processors/linecount/runs", "Content-Length: 100\r\n") + b"x")
        kept_alive = served.connect()
        kept_alive.sendall(
            b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\n\r\n"
        )
        stop = threading.Event()
        dropped_at: dict[int, float] = {}

        def trickle(sock: socket.socket, index: int) -> None:
            head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 1000
            for byte in head:
                if stop.is_set():
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    dropped_at[index] = time.monotonic() - opened
                    return
                time.sleep(0.1)

        trickles = [
            threading.Thread(target=trickle, args=(s, i), daemon=True)
            for i, s in enumerate(slow_heads)
        ]
        for t in trickles:
            t.start()
        try:
            # Everybody else is answered promptly meanwhile.
            latencies = []
            for _ in range(20):
                began = time.monotonic()
                assert served.client.get("/processors").status_code == 200
                latencies.append(time.monotonic() - began)
                time.sleep(0.05)
            assert max(latencies) < 2, latencies
            # The idle connections are closed at the head deadline (2 s), not kept forever.
            assert all(_closed_by_server(s, timeout=6) for s in idle)
            closed_idle = time.monotonic() - opened
            # The slow body gets 408 at the body deadline.
            assert _answer(slow_body, timeout=6).startswith(b"HTTP/1.1 408 ")
            # The tricklers are dropped although they send a byte every 0.1 s.
            for t in trickles:
                t.join(timeout=10)
            assert not any(t.is_alive() for t in trickles)
            assert len(dropped_at) == 5 and max(dropped_at.values()) < 6, dropped_at
            # A connection idle after its answer is closed too (the head deadline, or
            # uvicorn's 5 s keep-alive timeout, whichever comes first).
            assert _answer(kept_alive, timeout=10).startswith(b"HTTP/1.1 200 ")
            assert 1.5 < closed_idle < 6, closed_idle
        finally:
            stop.set()
            for s in [*idle, *slow_heads, slow_body, kept_alive]:
                s.close()
        # A fresh connection: the shared client's one has idled past the head deadline, and
        # the server closing it could cross this request on the wire (a reset, seen once).
        with httpx.Client(base_url=served.base_url, headers=AUTH, timeout=10) as fresh:
            assert fresh.get("/health").status_code == 200


def test_connections_past_the_limit_get_503_until_they_are_dropped(
    data_dir: Path, db: Path, linecount: Any
) -> None:
    app = create_app(data_dir, db, token=TOKEN, prefect_url="http://127.0.0.1:9/api")
    with Served(app, head_timeout=2, max_connections=20) as served:
        hogs = [served.connect() for _ in range(25)]
        try:
            time.sleep(0.2)
            with httpx.Client(base_url=served.base_url, headers=AUTH, timeout=10) as fresh:
                crowded = fresh.get("/health")
            assert crowded.status_code == 503  # an answer, not a hang
            assert all(_closed_by_server(s, timeout=6) for s in hogs)
            with httpx.Client(base_url=served.base_url, headers=AUTH, timeout=10) as fresh:
                assert fresh.get("/health").status_code == 200
        finally:
            for s in hogs:
                s.close()


def _flood(base_url: str, total: int = 1000, threads: int = 20) -> list[int]:
    """`total` trigger calls with a wrong token, from `threads` keep-alive clients."""

    def burst(_: int) -> list[int]:
        with httpx.Client(
            base_url=base_url, headers={"Authorization": "Bearer wrong"}, timeout=30
        ) as c:
            return [
                c.post("/processors/linecount/runs").status_code for _ in range(total // threads)
            ]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [code for codes in pool.map(burst, range(threads)) for code in codes]


def test_a_flood_of_bad_tokens_neither_grows_the_database_nor_slows_a_run(
    prefect_api: str, data_dir: Path, db: Path, linecount: Any, tmp_path: Path
) -> None:
    """1,000 unauthenticated triggers (loopback) are refused without a database write: the
    file does not change, and a run going meanwhile (a commit per task) is not held up by
    them competing for its lock."""
    import subprocess
    import sys

    from state.migrations import migrate
    from tests.conftest import subprocess_env, user_line, write_session

    with connect(db) as con:
        migrate(con)
    before = (db.stat().st_size, db.stat().st_mtime_ns)
    app = create_app(data_dir, db, token=TOKEN, prefect_url=prefect_api)
    with Served(app) as served:
        assert _flood(served.base_url) == [401] * 1000
        assert (db.stat().st_size, db.stat().st_mtime_ns) == before
        assert not db.with_name(db.name + ".wal").exists()
        assert app.state.webhook.unauthorised == 1000

        for i in range(40):
            write_session(data_dir, f"u{i % 4}/s{i}.jsonl", [user_line(str(i))])
        exe = str(Path(sys.executable).with_name("session-pipeline"))
        run = subprocess.Popen(
            [exe, "run", "linecount", "--json", "--data-dir", str(data_dir), "--db", str(db)],
            env=subprocess_env(prefect_api, SESSION_PIPELINE_COMMIT_SECONDS="0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            floods = 0
            while run.poll() is None and floods < 5:  # bounded: at most 5,000 more calls
                assert _flood(served.base_url) == [401] * 1000
                floods += 1
            out, err = run.communicate(timeout=240)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(timeout=30)
    assert run.returncode == 0, err[-2000:]
    assert '"processed": 40' in out and '"errors": 0' in out
    assert floods >= 1  # the run was going while at least one flood hit
    with connect(db, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM trigger_audit").fetchone() == (0,)
        (seconds,) = con.execute("SELECT duration_seconds FROM processor_runs").fetchone() or (0,)
    assert seconds < 120  # a generous bound: a run of 40 small sessions takes seconds
