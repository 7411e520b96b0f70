"""An OpenAI-compatible chat endpoint (vLLM, Ollama, TGI, llama.cpp server) as the generator.

Images travel as base64 PNG data URLs in ``image_url`` content parts, the format those servers
accept for vision models. Timeouts are explicit; connection errors, 429 and 5xx are retried with
exponential backoff; any other 4xx fails at once with the server's message, since retrying a
bad request cannot help.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Any

import numpy as np

from retrieval.encoders.preprocess import to_uint8_rgb
from retrieval.rag.prompting import SYSTEM, build_prompt, parse_generated
from retrieval.rag.types import Draft, DraftContext, DraftImages


class GeneratorError(RuntimeError):
    """The endpoint could not produce a draft (message says why; no PHI in it)."""


def data_url(image: np.ndarray, max_side: int = 1024) -> str:
    im = to_uint8_rgb(image)
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class OpenAICompatibleGenerator:
    name = "openai-compatible"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 1.0, max_tokens: int = 512, max_reference_images: int = 3) -> None:
        self.url = base_url.rstrip("/") + ("/chat/completions" if base_url.rstrip("/").endswith("/v1")
                                           else "/v1/chat/completions")
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.retries, self.backoff, self.max_tokens, self.max_refs = retries, backoff, max_tokens, max_reference_images

    def request_body(self, ctx: DraftContext, images: DraftImages | None) -> dict[str, Any]:
        images = images or DraftImages()
        refs = images.references[: self.max_refs]
        prompt = build_prompt(ctx, len(images.current), min(1, len(images.prior)), [r[0] for r in refs])
        parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(i)}}
                             for i in [*images.current, *images.prior[:1], *(r[1] for r in refs)]]
        parts.append({"type": "text", "text": prompt})
        return {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": parts}]}

    def generate(self, ctx: DraftContext, images: DraftImages | None = None) -> Draft:
        import httpx

        body = self.request_body(ctx, images)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        last = ""
        for attempt in range(self.retries + 1):
            try:
                r = httpx.post(self.url, json=body, headers=headers, timeout=self.timeout)
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout:.0f}s"
            except httpx.TransportError as exc:
                last = f"connection failed ({type(exc).__name__})"
            else:
                if r.status_code == 200:
                    try:
                        text = r.json()["choices"][0]["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        raise GeneratorError(f"{self.url}: unexpected response shape ({exc})") from exc
                    if isinstance(text, list):  # some servers return content parts
                        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
                    return parse_generated(str(text or ""), ctx, self.name)
                if r.status_code != 429 and r.status_code < 500:
                    raise GeneratorError(f"{self.url}: HTTP {r.status_code}: {r.text[:300]}")
                last = f"HTTP {r.status_code}"
            if attempt < self.retries:
                time.sleep(self.backoff * (2 ** attempt))
        raise GeneratorError(f"{self.url}: no draft after {self.retries + 1} attempts (last: {last})")
