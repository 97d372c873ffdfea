"""N concurrent streaming completions against an OpenAI-compatible server, through the official
`openai` package (AsyncOpenAI, no retries): a seeded random third of the clients disconnect after a
few chunks. Prints one JSON object: how many completed (their usage's token counts), were refused with 429,
disconnected, and every other outcome as an error string.

    python drill_clients.py BASE_URL MODEL N MAX_TOKENS SEED
"""
import asyncio
import json
import random
import sys
import time

import httpx
import openai


async def one(client, model, i, max_tokens, leave_after, out):
    try:
        stream = await client.completions.create(
            model=model, prompt=f"Client {i} asks:", max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks, usage = 0, None
        async for chunk in stream:
            chunks += 1
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            if leave_after is not None and chunks >= leave_after:
                await stream.close()
                out["disconnected"] += 1
                return
        out["completed"] += 1
        out["completed_tokens"].append(usage)
    except openai.RateLimitError:
        out["refused"] += 1
    except Exception as e:  # every other outcome is a failure of the drill
        out["errors"].append(f"client {i}: {type(e).__name__}: {e}")


async def main():
    base, model, n, max_tokens, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    rng = random.Random(seed)
    leaving = set(rng.sample(range(n), n // 3))
    out = {"completed": 0, "refused": 0, "disconnected": 0, "errors": [], "completed_tokens": [],
           "planned_disconnects": len(leaving)}
    limits = httpx.Limits(max_connections=n + 16, max_keepalive_connections=0)
    http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0))
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, http_client=http)
    start = time.time()
    await asyncio.gather(*(one(client, model, i, max_tokens, rng.randint(1, max_tokens // 2) if i in leaving else None, out)
                           for i in range(n)))
    out["seconds"] = round(time.time() - start, 2)
    await http.aclose()
    print(json.dumps(out))


asyncio.run(main())
