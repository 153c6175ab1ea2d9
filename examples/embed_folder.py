"""Embed a folder of images into a resumable output (sscd-embed's layout) from Python.

    python examples/embed_folder.py photos/ runs/photos --url 127.0.0.1:8001
"""
import argparse

from sscd_triton import Client, load_embeddings


def show(embedded: int, failed: int, total: int | None) -> None:
    print(f"\r{embedded + failed} of {total or '?'} done, {failed} failed", end="", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("output", help="a folder (Parquet shards) or a name ending .npz")
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC HOST:PORT")
    args = parser.parse_args()
    with Client(args.url) as client:
        summary = client.embed_files([args.folder], output=args.output, progress=show)
    print(f"\nembedded {summary.new_embedded}, failed {summary.new_failed}, skipped "
          f"{summary.skipped} in {summary.elapsed:.1f}s ({summary.info['dims']} dims)")
    ids, embeddings = load_embeddings(args.output)
    print(f"{args.output} holds {len(ids)} descriptors, {embeddings.shape}")


if __name__ == "__main__":
    main()
