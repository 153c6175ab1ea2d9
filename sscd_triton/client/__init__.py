"""Embedding through a Triton server: the Python API and the engine of `sscd-embed`.

    from sscd_triton import Client
    with Client("127.0.0.1:8001") as client:
        emb = client.embed(["a.jpg", b"<encoded bytes>"])   # float32 [2, dims]

Modules (flat, small): `job` (an embedding job over files into an output: the engine of
sscd-embed and Client.embed_files), `model_info` (what the server serves), `pipeline`
(units of work, reading, batching, dispatch), `transport` (endpoints, retries, splitting
rejected batches, shared memory), `errors` (what a failed call means), `exceptions`
(what the library raises), `sources` (lazy input enumeration, partitions of listings),
`idset` (compact set of seen ids), `io` (Parquet shards, done-markers, model identity,
`.npz`, `load_embeddings`), `progress`, `ray_embed` (the job on Ray Data) and
`parity_check` (the only module that imports torch). Copy detection on descriptors is
`sscd_triton.copydetect`.
"""
