"""The big model as any OpenAI-compatible completions server: vLLM, llama.cpp's server, TGI, a hosted API.

    big:
      backend: openai
      base_url: http://127.0.0.1:8080/v1   # the API root, before /completions
      model: null                          # null: the first model the server lists
      api_key_env: null                    # or e.g. OPENAI_API_KEY: the NAME of the variable with the key
      extra_body: {repeat_penalty: 1.0}    # llama.cpp's server: make temperature 0 plain greedy decoding

Each call is one `POST {base_url}/completions` of `context + text` (retrieval's passages are the context,
`lacy.cascade.big.Retrieval`), greedy (temperature 0), asking for the call's `max_tokens` tokens. The
reply is then cut at the call's unit on its text (`cut`): a server hands back text, not token ids, so the
local backend's rule (`lacy.cascade.hf_big.BigLM.continue_text`, which stops before the token that would
end the word or entity) is applied to characters instead. The two agree wherever the tokenizer splits a
word from the punctuation and space after it, as BPE pre-tokenisers do. `processed` and `generated` are
the server's `usage`: every prompt token it read and every token it wrote, those past the cut included
(what the server spent; it keeps no session, so it reads each call's whole text).

Failures, each call's own: a 429, a 5xx, a refused or broken connection and a timeout are tried again
(`big.retries` times, waits doubling from `big.backoff_s`, a server's Retry-After honoured up to
`big.backoff_max_s`), then the call answers 503 (`BigUnavailable`): the cascade's "big model
unavailable" (a 503 with Retry-After, or the flagged small-only answer with `allow_undelegated`). A 401 or
403 is a wrong or missing key (an error naming `big.api_key_env`), a 404 a wrong `big.base_url` or
`big.model` (both refused by `from_config` already when the server answers then), any other 4xx the
call's own fault (400). The calls of a batch, and those of concurrent requests, run at most
`big.concurrency` at once. There are no server-side sessions: `end_session` does nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import httpx

from lacy.cascade.big import BigCall, BigModelError, BigReply, BigRequestError, BigUnavailable
from lacy.core.config import BigModelConfig, ConfigError, LacyConfig

log = logging.getLogger(__name__)

class Misconfigured(BigModelError):
    """The server refuses us whatever the call (a wrong key, base URL or model): the message names the field."""


POLL_S = 0.1
"""How often a waiting batch looks at its `cancel` event (a client that left)."""


def cut(text: str, unit: str) -> str:
    """`text` ended where the local backend stops decoding for `unit`, read on characters.

    "word": everything up to the first letter or digit (spaces, punctuation), then that word's letters and
    digits; the next space or punctuation ends it. "entity": like a word, but a space followed by a capital
    or a digit goes on to the next word while every word so far starts with a capital or a digit
    ("Barack Obama", "4 August 1961"). "tokens": the whole text."""
    if unit == "tokens":
        return text
    capital = lambda w: w[:1].isupper() or w[:1].isdigit()
    i, n = 0, len(text)
    while i < n and not text[i].isalnum():  # no word yet: nothing ends the unit
        i += 1
    while True:
        while i < n and text[i].isalnum():
            i += 1
        if i >= n - 1 or unit == "word" or text[i] not in " \t":
            return text[:i]
        # entity, at a space: the next word joins if it and every word so far are capitalised or numeric
        if not capital(text[i + 1]) or not all(capital(w) for w in text[:i].split()):
            return text[:i]
        i += 1


class OpenAIBig:
    """The `BigModel` backend of an OpenAI-compatible completions server (see the module's docstring)."""

    def __init__(self, cfg: BigModelConfig, api_key: str | None = None, section: str = "big") -> None:
        self.cfg = cfg
        self.section = section
        """The config section of these settings, named in errors (the LLM judge reuses this backend)."""
        self.server = "the big model's server" if section == "big" else f"the server of {section}"
        self.base_url = cfg.base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            base_url=self.base_url, headers=headers,
            timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s),
            limits=httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency))
        self.pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="openai-big")
        self._model = cfg.model
        self._lock = threading.Lock()
        self.stats: dict[str, float] = {"calls": 0, "retries": 0, "unavailable": 0, "failed": 0, "seconds": 0.0}
        """Calls answered, tries repeated, calls answered 503, calls failed otherwise, seconds in requests."""

    @classmethod
    def from_config(cls, cfg: LacyConfig, device: str | None = None) -> OpenAIBig:
        """The server of `cfg.big`, its key read from the variable `big.api_key_env` names (`device` is the
        server's business)."""
        return cls.connect(cfg.big, "big")

    @classmethod
    def connect(cls, settings: BigModelConfig, section: str) -> OpenAIBig:
        """The server of `settings` (config section `section`, named in errors), its key read from the
        variable `api_key_env` names; a wrong key or URL refused at once (ConfigError)."""
        name = settings.api_key_env
        key = os.environ.get(name) if name else None
        if name and not key:
            raise ConfigError(f"{section}.api_key_env: the environment variable {name} is not set (or empty) in "
                              f"this process; set it to the server's API key, or set {section}.api_key_env to "
                              "null for a server without one")
        big = cls(settings, key, section)
        try:  # a wrong key or URL is the deployment's error: say so at once, not as every call's 500
            models = big._models(settings.connect_timeout_s, tries=1)
            if settings.model is not None and settings.model not in models:
                log.warning("%s.model %r is not among the models the server lists (%s)", section, settings.model,
                            models[:8])
        except Misconfigured as err:
            big.close()
            raise ConfigError(f"{err} (the server at {big.base_url})") from None
        except BigModelError as err:  # not up yet, say: its calls answer 503 until it is
            log.warning("%s does not answer yet: %s", big.server, err)
        return big

    def complete(self, prompt: str, max_tokens: int, stop: list[str] | None = None) -> str:
        """The server's greedy completion of `prompt` (whole, uncut), with the retries of a call; raises the
        BigModelError of its failure (`BigUnavailable` once the retries are spent)."""
        body = {**self.cfg.extra_body, "model": self.model(), "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0.0, "n": 1, "stream": False, **({"stop": stop} if stop else {})}
        return _reply(self._request("POST", "/completions", json=body), "tokens", self.server).text

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    # -- the BigModel interface -----------------------------------------------------------------

    def continue_batch(self, calls: Sequence[BigCall], cancel: threading.Event | None = None) -> list[BigReply]:
        futures: list[Future | BigReply] = []
        for call in calls:
            try:
                call.check()
                if call.retrieval:
                    raise BigRequestError("retrieval was asked for but this big model has no knowledge store")
                futures.append(self.pool.submit(self._continue, call, cancel))
            except BigModelError as err:
                futures.append(BigReply.failure(err))
        return [f if isinstance(f, BigReply) else self._wait(f, cancel) for f in futures]

    def end_session(self, session: str) -> None:
        """Nothing: the server keeps no session (each call carries its whole text)."""

    def health(self, timeout_s: float = 0.0) -> dict:
        """The server's model list (GET /models), or BigUnavailable / BigModelError when it does not answer."""
        models = self._models(timeout_s if timeout_s > 0 else self.cfg.timeout_s, tries=1)
        with self._lock:
            if self._model is None and models:
                self._model = models[0]
            return {"backend": "openai", "model": self._model, "server_models": models[:8],
                    "retrieval_available": False, "stats": dict(self.stats)}

    # -- one call -------------------------------------------------------------------------------

    def _wait(self, future: Future, cancel: threading.Event | None) -> BigReply:
        while True:  # bounded: the request's own timeouts and retries end it, or the client leaves
            if cancel is not None and cancel.is_set():
                future.cancel()
                return BigReply.failure(BigModelError("cancelled: the client left"))
            try:
                return future.result(timeout=POLL_S if cancel is not None else None)
            except FutureTimeout:
                continue

    def _continue(self, call: BigCall, cancel: threading.Event | None) -> BigReply:
        start = time.perf_counter()
        try:
            body = {**self.cfg.extra_body, "model": self.model(cancel), "prompt": call.context + call.text,
                    "max_tokens": call.max_tokens, "temperature": 0.0, "n": 1, "stream": False}
            answer = self._request("POST", "/completions", json=body, cancel=cancel)
            reply = _reply(answer, call.unit, self.server)
            key = "calls"
        except BigModelError as err:
            reply = BigReply.failure(err)
            key = "unavailable" if reply.status == 503 else "failed"
            if reply.status == 500:
                log.error("big-model call failed: %s", err)
        except Exception as err:  # anything else is ours: this call fails alone, the details stay in the log
            log.exception("big-model call failed")
            reply, key = BigReply.failure(err), "failed"
        with self._lock:
            self.stats[key] += 1
            self.stats["seconds"] += time.perf_counter() - start
        return reply

    def model(self, cancel: threading.Event | None = None) -> str:
        """`<section>.model`, or the first model the server lists (asked once, tried as a call is)."""
        with self._lock:
            if self._model is not None:
                return self._model
        models = self._models(self.cfg.timeout_s, cancel=cancel)
        if not models:
            raise Misconfigured(f"{self.section}.model: the server at {self.section}.base_url lists no model; set "
                                f"{self.section}.model")
        with self._lock:
            self._model = models[0]
        return models[0]

    def _models(self, timeout_s: float, tries: int | None = None, cancel: threading.Event | None = None) -> list[str]:
        answer = self._request("GET", "/models", timeout=httpx.Timeout(timeout_s, connect=min(
            timeout_s, self.cfg.connect_timeout_s)), tries=tries, cancel=cancel)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise BigModelError(f"/models answered no model list: is {self.section}.base_url the API root?")
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]

    def _request(self, method: str, path: str, *, cancel: threading.Event | None = None,
                 tries: int | None = None, **kwargs: Any) -> Any:
        """The server's JSON answer to one request, tried again on the failures that pass; raises the
        BigModelError of the call's status (see the module's docstring)."""
        tries = self.cfg.retries + 1 if tries is None else tries
        url, why, retry_after = f"{self.base_url}{path}", "", None
        for attempt in range(tries):
            if attempt:
                wait = min(max(self.cfg.backoff_s * 2 ** (attempt - 1), retry_after or 0.0), self.cfg.backoff_max_s)
                with self._lock:
                    self.stats["retries"] += 1
                log.warning("%s %s: %s; trying again in %.1f s (%d/%d)", method, url, why, wait, attempt, tries - 1)
                if cancel is not None and cancel.wait(wait):
                    raise BigModelError("cancelled: the client left")
                if cancel is None:
                    time.sleep(wait)
            try:
                response = self.client.request(method, path, **kwargs)
            except httpx.TimeoutException as err:
                why = f"no answer in time ({type(err).__name__}; {self.section}.timeout_s {self.cfg.timeout_s:g})"
                retry_after = None
                continue
            except httpx.TransportError as err:  # refused, reset, closed mid-answer
                why, retry_after = f"cannot reach the server ({type(err).__name__})", None
                continue
            status = response.status_code
            if status == 429 or status >= 500:
                why, retry_after = f"answered {status}", _seconds(response.headers.get("retry-after"))
                continue
            if status in (401, 403):
                raise Misconfigured(self._key_refused(status))
            if status == 404:
                sec = self.section
                raise Misconfigured(f"{sec}.base_url/{sec}.model: {path} answered 404 ({_message(response)}); "
                                    f"{sec}.base_url must be the API root (e.g. http://HOST:PORT/v1), {sec}.model "
                                    f"({self._model!r}) "
                                    "one the server serves")
            if status >= 400:
                raise BigRequestError(f"{self.server} refused the call ({status}: {_message(response)})")
            try:
                return response.json()
            except ValueError:
                raise BigModelError(f"{path} answered {status} with no JSON: is {self.section}.base_url the API "
                                    "root?") from None
        # No address in the message: a service passes it on to its clients (the log has it).
        if tries > 1:
            log.warning("%s %s: %s after %d tries; answering 503", method, url, why, tries)
        raise BigUnavailable(f"{self.server} did not answer after {tries} tr{'ies' if tries > 1 else 'y'} "
                             f"({why})")

    def _key_refused(self, status: int) -> str:
        name, field = self.cfg.api_key_env, f"{self.section}.api_key_env"
        if name is None:
            return (f"{field}: {self.server} wants an API key ({status}); set {field} to the name of the "
                    "environment variable that holds it")
        return f"{field}: {self.server} refused the API key in ${name} ({status}); check the variable {field} names"


def _reply(answer: Any, unit: str, server: str = "the big model's server") -> BigReply:
    """A completion answer as a BigReply: the first choice's text cut at `unit`, the server's usage."""
    try:
        text = answer["choices"][0]["text"]
    except (KeyError, IndexError, TypeError):
        text = None
    if not isinstance(text, str):
        raise BigModelError(f"{server} answered without a completion text")
    usage = answer.get("usage") or {}
    count = lambda key: usage.get(key) if isinstance(usage.get(key), int) else 0
    return BigReply(cut(text, unit), count("prompt_tokens"), count("completion_tokens"))


def _message(response: httpx.Response) -> str:
    """The server's own error message (OpenAI's {"error": {"message"}}, FastAPI's {"detail"}), trimmed."""
    try:
        body = response.json()
    except ValueError:
        body = response.text
    text = body
    if isinstance(body, dict):
        error = body.get("error")
        text = (error.get("message") if isinstance(error, dict) else error) or body.get("detail") or body
    return " ".join(str(text).split())[:300]


def _seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds (its HTTP-date form is left to the backoff)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
