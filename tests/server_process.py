"""`codegen-lm serve` started as users start it, in its own process on 127.0.0.1 with a free port."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import torch


class Server:
    def __init__(self, folder: Path, *options: str, command: list[str] | None = None) -> None:
        """`codegen-lm serve --model folder options...`, or `command`: any server that prints "... on
        http://HOST:PORT " on stderr once it accepts connections (bench/hf_server.py does)."""
        command = command or [sys.executable, "-m", "codegen_lm", "serve", "--model", str(folder), "--port", "0",
                              "--threads", str(torch.get_num_threads()), "--log-level", "warning", *options]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            found = re.search(r"on (http://\S+) ", line)
            if found:
                self.url = found.group(1)
                break
            if not line and self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}")
        else:
            raise RuntimeError("the server did not start in 120 s")

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics").text
        found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
