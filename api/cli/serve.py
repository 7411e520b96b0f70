"""``medrag serve``: the HTTP API and web page (and API key creation).

Slow clients are handled by :mod:`api.protocol` (request deadline, evicting connection cap), the
log volume by :mod:`api.logging_limits`; ``deploy/nginx/medrag.conf`` is the recommended front.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sv = sub.add_parser("serve", help="the HTTP API and the web page")
    sv.add_argument("--index", help="index URI to serve")
    sv.add_argument("--api-keys", help="JSON file of hashed API keys")
    sv.add_argument("--add-key", metavar="NAME", help="create a key for NAME in --api-keys, print it once, exit")
    sv.add_argument("--allow-anonymous", action="store_true", help="no API key needed (local development only)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--generator", choices=["structured", "extractive", "edit", "vlm", "http"], default="structured",
                    help="drafter: structured (rendered from the findings table; the default), extractive or edit "
                         "(retrieved sentences, safety-gated), vlm (--model-dir) or http (--base-url, --model)")
    sv.add_argument("--model-dir")
    sv.add_argument("--base-url")
    sv.add_argument("--model")
    sv.add_argument("--max-body-mb", type=int, default=64)
    sv.add_argument("--no-text-encoder", action="store_true", help="do not load the report encoder")
    sv.add_argument("--request-timeout", type=float, default=10.0,
                    help="seconds a client has to send one request's headers and body (slow-loris guard)")
    sv.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle keep-alive connection stays open")
    sv.add_argument("--max-connections", type=int, default=4096,
                    help="open connections; beyond it the oldest one still sending its request is closed")
    sv.add_argument("--backlog", type=int, default=4096,
                    help="listen backlog (the kernel caps it at net.core.somaxconn); a burst of reconnecting "
                         "slow clients beyond it delays every new client's SYN by seconds")
    sv.add_argument("--max-header-kb", type=int, default=16, help="largest request head (request line + headers)")
    sv.add_argument("--log-per-second", type=int, default=20,
                    help="log lines per message kind per second; the rest are counted and summarised")
    sv.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's choice)")
    sv.add_argument("--faiss-threads", type=int, help="FAISS OpenMP threads (default: FAISS's choice)")
    sv.add_argument("--reload-interval", type=float, default=2.0,
                    help="seconds between checks for a newly published index version (0: never reload)")
    sv.add_argument("--batch-max", type=int, default=32, help="concurrent searches merged into one index call")
    sv.add_argument("--batch-wait-ms", type=float, default=2.0,
                    help="the longest a search waits for others to batch with (only when others are in flight, "
                    "and never longer than one engine call has been taking)")
    sv.set_defaults(func=_cmd_serve)


def _cmd_serve(a: argparse.Namespace) -> int:
    from retrieval.settings import env

    if a.add_key:
        from api.keys import add_key

        if not a.api_keys:
            raise ValueError("--add-key needs --api-keys FILE")
        key = add_key(a.api_keys, a.add_key)
        print(f"API key for {a.add_key} (shown once; only its hash is stored in {a.api_keys}):\n{key}")
        return 0
    if not a.index:
        raise ValueError("--index is required")
    if not a.api_keys and not a.allow_anonymous:
        raise ValueError("--api-keys FILE is required (create a key with --api-keys FILE --add-key NAME)")
    import uvicorn

    from api.app import create_app
    from api.protocol import GuardedH11Protocol
    from api.settings import Settings

    settings = Settings(index=a.index, api_keys_file=a.api_keys, allow_anonymous=a.allow_anonymous, device=a.device,
                        max_body_bytes=a.max_body_mb * 1024 * 1024, generator=a.generator,
                        generator_model_dir=a.model_dir, generator_base_url=a.base_url, generator_model=a.model,
                        generator_api_key=env().llm_api_key,
                        load_text_encoder=not a.no_text_encoder, torch_threads=a.torch_threads,
                        faiss_threads=a.faiss_threads, batch_max=a.batch_max, batch_wait_ms=a.batch_wait_ms,
                        reload_interval_s=a.reload_interval)
    logging.getLogger("medrag.api").setLevel(logging.INFO)
    GuardedH11Protocol.request_timeout_s = a.request_timeout
    import resource

    # Descriptors: 256 kept for index files, models and threads; asyncio accepts up to `backlog`
    # sockets in one go before any of them is counted, so connections + backlog must fit as well
    # (else a burst of slow clients hits EMFILE and accepting stops for a second).
    fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    backlog = max(64, min(a.backlog, (fds - 256) // 4))
    GuardedH11Protocol.max_connections = max(16, min(a.max_connections, fds - 256 - backlog))
    config = uvicorn.Config(create_app(settings), host=a.host, port=a.port, log_level="warning", access_log=False,
                            http=GuardedH11Protocol, timeout_keep_alive=int(max(1, a.keep_alive)),
                            backlog=backlog, h11_max_incomplete_event_size=a.max_header_kb * 1024)
    server = uvicorn.Server(config)
    from api.logging_limits import install

    _limit_logs(install, a.log_per_second)
    server.run()
    return 0


def _limit_logs(install: Any, per_second: int) -> None:
    """Rate-limit the server's loggers (uvicorn configures its handlers when the config loads)."""
    install(per_second=per_second)
