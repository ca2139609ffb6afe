"""The server people write themselves, as the peer in bench/serving.py: `transformers`' generate behind
the same web framework (Starlette on uvicorn), one request at a time, streaming with transformers'
TextIteratorStreamer. Greedy or sampled completions in OpenAI's completions shape (the fields the
benchmark sends: prompt, max_tokens, temperature, stream).

    python bench/hf_server.py MODEL_DIR [PORT]     (default 0: a free port, printed on stderr)
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time

import torch
import transformers
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


def main() -> None:
    folder, port = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lock = asyncio.Lock()  # one generate at a time

    def generate(body: dict, streamer) -> None:
        ids = tok(body["prompt"], return_tensors="pt").input_ids
        temperature = float(body.get("temperature", 1.0))
        kwargs = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(body.get("max_tokens", 16)),
                           min_new_tokens=int(body.get("max_tokens", 16)), streamer=streamer,
                           pad_token_id=tok.eos_token_id, **kwargs)

    async def completions(request: Request):
        body = await request.json()
        streamer = transformers.TextIteratorStreamer(tok, skip_prompt=True)
        created = int(time.time())

        def chunk(text: str, reason: str | None) -> str:
            return "data: " + json.dumps({"id": "cmpl-hf", "object": "text_completion", "created": created,
                                          "model": "hf", "choices": [{"index": 0, "text": text, "logprobs": None,
                                                                      "finish_reason": reason}]}) + "\n\n"

        async def events():
            async with lock:
                thread = threading.Thread(target=generate, args=(body, streamer))
                thread.start()
                loop = asyncio.get_running_loop()
                pieces = iter(streamer)
                while True:
                    piece = await loop.run_in_executor(None, next, pieces, None)
                    if piece is None:
                        break
                    if piece:
                        yield chunk(piece, None)
                thread.join()
            yield chunk("", "length")
            yield "data: [DONE]\n\n"

        if body.get("stream"):
            return StreamingResponse(events(), media_type="text/event-stream")
        text = "".join([json.loads(e[6:])["choices"][0]["text"] async for e in events() if "[DONE]" not in e])
        return JSONResponse({"id": "cmpl-hf", "object": "text_completion", "created": created, "model": "hf",
                             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}]})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": "hf", "object": "model"}]})

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/models", models, methods=["GET"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)  # connections wait for uvicorn from here on
    print(f"serving on http://127.0.0.1:{sock.getsockname()[1]} ", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
