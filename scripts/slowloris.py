#!/usr/bin/env python3
"""Slow-loris check: hold N idle or half-sent connections, meanwhile time ``GET /health/live``.

Usage: ``python scripts/slowloris.py http://127.0.0.1:8000 --connections 3000 --seconds 20``

Three kinds of slow client, in equal parts: connections that send nothing, ones that send a
request line and then one header byte every few seconds, and ones that announce a body they
send a byte at a time. Whenever the server drops a connection it is reopened (an attacker
would). Every ``--probe-every`` seconds a fresh connection asks ``/health/live``; the report
gives the probes' p50/max latency, how many failed or took over ``--budget`` seconds, and how
many slow connections the server closed. Exit status 1 when any probe failed or was too slow.
Keeps within the process's file-descriptor limit (it raises the soft limit to the hard one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from urllib.parse import urlsplit


async def _slow_client(host: str, port: int, kind: int, stop: float, stats: dict[str, int]) -> None:
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            stats["connect_failed"] += 1
            await asyncio.sleep(0.5)
            continue
        stats["opened"] += 1
        try:
            if kind == 1:
                writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
            elif kind == 2:
                writer.write(b"POST /api/search/vector HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100000\r\n\r\n{")
            await writer.drain()
            while time.monotonic() < stop:
                try:
                    data = await asyncio.wait_for(reader.read(1024), timeout=3.0)
                    if not data:  # the server closed us
                        stats["closed_by_server"] += 1
                        break
                except TimeoutError:
                    if kind == 1:
                        writer.write(b"X")  # one header byte every few seconds
                    elif kind == 2:
                        writer.write(b" ")
                    await writer.drain()
        except (ConnectionError, OSError):
            stats["closed_by_server"] += 1
        finally:
            writer.close()


async def _probe(host: str, port: int, timeout: float, source: str | None) -> float | None:
    t0 = time.perf_counter()
    try:
        local = (source, 0) if source else None
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=local), timeout)
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.read(64), timeout)
        writer.close()
        return time.perf_counter() - t0 if head.startswith(b"HTTP/1.1 200") else None
    except (OSError, TimeoutError):
        return None


async def run(url: str, connections: int, seconds: float, probe_every: float, budget: float,
              probe_source: str | None = None) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    stats = {"opened": 0, "closed_by_server": 0, "connect_failed": 0}
    stop = time.monotonic() + seconds
    clients = []
    for i in range(connections):  # ramp up over about a second
        clients.append(asyncio.create_task(_slow_client(host, port, i % 3, stop, stats)))
        if i % 200 == 199:
            await asyncio.sleep(0.05)
    await asyncio.sleep(min(2.0, seconds / 4))  # let them settle in
    # the probe runs in its own process: this event loop is busy with thousands of sockets, and
    # its delays must not be counted as the server's
    probe = await asyncio.create_subprocess_exec(
        sys.executable, __file__, url, "--probe-only", "--seconds", str(max(1.0, stop - time.monotonic() - 0.5)),
        "--probe-every", str(probe_every), "--budget", str(budget),
        *(["--probe-source", probe_source] if probe_source else []), stdout=asyncio.subprocess.PIPE)
    out, _ = await probe.communicate()
    lat, failed = json.loads(out)
    for t in clients:
        t.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    lat.sort()
    return {"url": url, "slow_connections": connections, "seconds": seconds, "probes": len(lat) + failed,
            "probe_failed": failed, "probe_over_budget": sum(1 for x in lat if x > budget),
            "probe_p50_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
            "probe_max_ms": round(lat[-1] * 1000, 1) if lat else None, **stats}


async def _probe_loop(url: str, seconds: float, probe_every: float, budget: float,
                      source: str | None) -> tuple[list[float], int]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    stop = time.monotonic() + seconds
    lat: list[float] = []
    failed = 0
    while time.monotonic() < stop:
        r = await _probe(host, port, budget * 3, source)
        if r is None:
            failed += 1
        else:
            lat.append(r)
        await asyncio.sleep(probe_every)
    return lat, failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--probe-every", type=float, default=0.25)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds /health/live may take")
    ap.add_argument("--probe-source", help="source address of the probe, e.g. 127.0.0.2: a health checker is "
                                           "not the attacker (per-address limits such as nginx's limit_conn)")
    ap.add_argument("--probe-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.probe_only:
        print(json.dumps(asyncio.run(_probe_loop(a.url, a.seconds, a.probe_every, a.budget, a.probe_source))))
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if a.connections + 64 > limit:
        ap.error(f"--connections {a.connections} needs more file descriptors than this process has ({limit})")
    out = asyncio.run(run(a.url, a.connections, a.seconds, a.probe_every, a.budget, a.probe_source))
    print(json.dumps(out))
    return 1 if out["probe_failed"] or out["probe_over_budget"] else 0


if __name__ == "__main__":
    sys.exit(main())
