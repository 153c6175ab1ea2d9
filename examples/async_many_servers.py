"""Embed files through several Triton servers at once with AsyncClient (a server that is
down leaves the rotation; the others take the work).

    python examples/async_many_servers.py a.jpg b.png --url h1:8001 --url h2:8001
"""
import argparse
import asyncio

from sscd_triton import AsyncClient


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--url", action="append", help="Triton gRPC HOST:PORT (repeatable)")
    args = parser.parse_args()
    async with AsyncClient(args.url or ["127.0.0.1:8001"], concurrency=16) as client:
        embeddings = await client.embed(args.files, errors="nan")
        print(client.model_info)
    print(embeddings.shape, "failed:", client.last_errors or "none")


if __name__ == "__main__":
    asyncio.run(main())
