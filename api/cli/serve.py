"""``medrag serve``: the HTTP API and web page (and API key creation).
"""

from __future__ import annotations

import argparse
import logging


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sv = sub.add_parser("serve", help="the HTTP API and the web page")
    sv.add_argument("--index", help="index URI to serve")
    sv.add_argument("--api-keys", help="JSON file of hashed API keys")
    sv.add_argument("--add-key", metavar="NAME", help="create a key for NAME in --api-keys, print it once, exit")
    sv.add_argument("--allow-anonymous", action="store_true", help="no API key needed (local development only)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--generator", choices=["extractive", "vlm", "http"], default="extractive")
    sv.add_argument("--model-dir")
    sv.add_argument("--base-url")
    sv.add_argument("--model")
    sv.add_argument("--max-body-mb", type=int, default=64)
    sv.add_argument("--no-text-encoder", action="store_true", help="do not load the report encoder")
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
    from api.settings import Settings

    settings = Settings(index=a.index, api_keys_file=a.api_keys, allow_anonymous=a.allow_anonymous, device=a.device,
                        max_body_bytes=a.max_body_mb * 1024 * 1024, generator=a.generator,
                        generator_model_dir=a.model_dir, generator_base_url=a.base_url, generator_model=a.model,
                        generator_api_key=env().llm_api_key,
                        load_text_encoder=not a.no_text_encoder)
    logging.getLogger("medrag.api").setLevel(logging.INFO)
    uvicorn.run(create_app(settings), host=a.host, port=a.port, log_level="warning", access_log=False)
    return 0
