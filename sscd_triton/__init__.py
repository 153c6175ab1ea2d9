"""Shared core of sscd-triton: the facts every part of the project imports.

`from sscd_triton import load_embeddings` reads every output form of the embedding
client (a Parquet folder, an `.npz`, a version-1 folder of numpy shards):
`ids, embeddings = load_embeddings(path)`. It needs numpy (and pyarrow for folders),
never torch; `load_failures(path)` gives the failure records ({"id", "reason"}).
`find_copies(queries, references, k=10, threshold=None)` and
`dedup(embeddings, threshold=0.75, k=20, keep="largest")` find copies and near-duplicate
groups on descriptors (any of those outputs, `(ids, array)` or an array), returning
pyarrow tables (`sscd_triton.copydetect.api`; `Duplicates` is what dedup returns).
`check_complete(data)` raises ValueError naming the reason unless `data` is one whole
encoded image (zero padding allowed): the check every serving path runs before decoding
(`sscd_triton.images.check_complete`).
"""
from __future__ import annotations

__all__ = ["load_embeddings", "load_failures", "check_complete", "find_copies", "dedup",
           "Duplicates"]
_COPYDETECT = ("find_copies", "dedup", "Duplicates")
# The client API (sscd_triton/client/api.py): `with Client(url) as c: c.embed(items)`.
_API = ["Client", "AsyncClient", "ModelInfo"]
_EXCEPTIONS = ["BadImage", "SSCDError", "UsageError", "Unfinished", "ServerUnavailable",
               "ServerOverloaded", "RequestTimeout", "Interrupted", "OutputUnwritable"]
__all__ += _API + _EXCEPTIONS


def __getattr__(name: str):
    # Lazy: importing the package (spec, files, ...) must not import the client.
    if name == "check_complete":
        from sscd_triton import images

        return images.check_complete
    if name in _COPYDETECT:
        from sscd_triton.copydetect import api

        return getattr(api, name)
    if name in _API:
        from sscd_triton.client import api

        return getattr(api, name)
    if name in _EXCEPTIONS:
        from sscd_triton.client import exceptions

        return getattr(exceptions, name)
    if name in __all__:
        from sscd_triton.client import io

        return getattr(io, name)
    raise AttributeError(f"module 'sscd_triton' has no attribute {name!r}")
