"""Slow clients: request deadlines and a connection cap in ``medrag serve``, nginx in front, and
rate-limited logs. The served tests drive a real ``medrag serve`` (and a real nginx) process."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from api.logging_limits import RateLimitFilter

ROOT = Path(__file__).resolve().parents[1]


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("medrag.api", logging.INFO, __file__, 1, msg, args, None)


def test_log_lines_per_message_are_capped_and_the_rest_counted():
    now = [100.0]
    flt = RateLimitFilter(per_second=20, clock=lambda: now[0])
    passed = [flt.filter(_record("%s %s -> %d in %.1f ms", "GET", "/health/live", 200, i / 10)) for i in range(1000)]
    assert sum(passed) == 20 and passed[:20] == [True] * 20
    assert flt.filter(_record("Invalid HTTP request received."))  # another message has its own budget
    now[0] += 1.0
    rec = _record("%s %s -> %d in %.1f ms", "GET", "/health/live", 200, 1.0)
    assert flt.filter(rec) and rec.getMessage().endswith("(suppressed 980 similar messages)")
    rec = _record("%s %s -> %d in %.1f ms", "GET", "/health/live", 200, 1.0)
    assert flt.filter(rec) and "suppressed" not in rec.getMessage()


def test_a_flood_writes_a_bounded_number_of_lines(caplog):
    from api.logging_limits import install

    lg = logging.getLogger("medrag.api.flood-test")
    flt = install(["medrag.api.flood-test"], per_second=5)
    try:
        with caplog.at_level(logging.INFO, logger="medrag.api.flood-test"):
            for i in range(100_000):
                lg.info("GET %s -> %d", "/health/live", i)
        assert len(caplog.records) <= 5 * 3  # within a second or two of windows
    finally:
        lg.removeFilter(flt)
        for h in lg.handlers:
            h.removeFilter(flt)


# ---- served -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(uri: str, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", "--index", uri, "--allow-anonymous",
                             "--port", str(port), "--no-text-encoder", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"medrag serve did not start: {proc.communicate()[1][-2000:]}")


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        return proc.communicate(timeout=20)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1]


def _live_ms(url: str) -> float:
    t0 = time.perf_counter()
    r = httpx.get(url + "/health/live", timeout=5)
    assert r.status_code == 200
    return (time.perf_counter() - t0) * 1000


def _idle(port: int, n: int, partial: bool) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if partial:
            s.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")  # never finished
        socks.append(s)
    return socks


def _closed_by_server(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


@pytest.mark.integration
@pytest.mark.slow
def test_idle_and_half_sent_connections_are_closed_after_the_request_deadline(small_index):
    proc, url = _serve(small_index[1], "--request-timeout", "2")
    port = int(url.rsplit(":", 1)[1])
    socks = _idle(port, 150, partial=False) + _idle(port, 150, partial=True)
    try:
        assert _live_ms(url) < 1000
        time.sleep(3.5)
        closed = sum(_closed_by_server(s) for s in socks)
        assert closed == len(socks), f"{closed} of {len(socks)} slow connections closed"
        assert _live_ms(url) < 1000
    finally:
        for s in socks:
            s.close()
        _stop(proc)


@pytest.mark.integration
@pytest.mark.slow
def test_the_connection_cap_evicts_the_oldest_slow_connection_not_the_new_client(small_index):
    proc, url = _serve(small_index[1], "--max-connections", "50", "--request-timeout", "60")
    port = int(url.rsplit(":", 1)[1])
    socks = _idle(port, 120, partial=True)
    try:
        # the server must have accepted all 120 before the new client connects, else the ones it
        # accepts after the client are newer and the client is (rightly) among the oldest evicted
        closed: set[int] = set()
        deadline = time.monotonic() + 20
        while len(closed) < 70 and time.monotonic() < deadline:  # 120 - 50 are evicted
            closed |= {i for i, s in enumerate(socks) if i not in closed and _closed_by_server(s)}
        assert set(range(60)) <= closed  # the oldest were dropped ...
        assert _live_ms(url) < 1000  # ... and a new client is served
    finally:
        for s in socks:
            s.close()
        _stop(proc)


@pytest.mark.integration
@pytest.mark.slow
def test_slowloris_against_bare_server(small_index):
    proc, url = _serve(small_index[1], "--request-timeout", "3")
    try:
        run = subprocess.run([sys.executable, str(ROOT / "scripts" / "slowloris.py"), url, "--connections", "600",
                              "--seconds", "8"], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        assert '"probe_failed": 0' in run.stdout and '"probe_over_budget": 0' in run.stdout
    finally:
        _stop(proc)


def _nginx_conf(tmp: Path, listen: int, upstream: str) -> Path:
    site = (ROOT / "deploy" / "nginx" / "medrag.conf").read_text()
    site = site.replace("server 127.0.0.1:8000;", f"server {upstream};").replace("listen 8080", f"listen {listen}")
    assert f"listen {listen}" in site and upstream in site
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would switch to nobody
    conf.write_text(f"""{user}worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
{site}
}}
""")
    return conf


@pytest.mark.integration
@pytest.mark.slow
def test_slowloris_against_nginx_in_front(small_index, tmp_path):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx is not installed (scripts/test-deps.sh installs it)")
    proc, url = _serve(small_index[1])
    port = _free_port()
    conf = _nginx_conf(tmp_path, port, url.removeprefix("http://"))
    check = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    ng = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
                          stderr=subprocess.DEVNULL)
    try:
        front = f"http://127.0.0.1:{port}"
        for _ in range(50):
            try:
                if httpx.get(front + "/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        # limit_conn 64 per address: the slow connections above it are refused at once, the rest
        # time out after client_header_timeout; the probe (same address) must still get through
        run = subprocess.run([sys.executable, str(ROOT / "scripts" / "slowloris.py"), front, "--connections", "600",
                              "--seconds", "8", "--probe-source", "127.0.0.2"], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        assert '"probe_failed": 0' in run.stdout and '"probe_over_budget": 0' in run.stdout
    finally:
        ng.terminate()
        ng.wait(timeout=10)
        _stop(proc)
