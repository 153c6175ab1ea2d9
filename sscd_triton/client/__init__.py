"""Client side of sscd-triton: embed image collections through a Triton server.

    python client/embed.py photos/ --url 127.0.0.1:8001 --output runs/photos-emb

Modules (flat, small): `embed` (the CLI), `pipeline` (reading, batching, dispatch),
`transport` (endpoints, retries, splitting rejected batches, shared memory), `sources`
(lazy input enumeration), `idset` (compact set of seen ids), `io` (shards, failures,
`load_embeddings`), `parity_check` (the only module that imports torch) and
`postprocess` (centering, PCA whitening, score normalisation; numpy only).
"""
