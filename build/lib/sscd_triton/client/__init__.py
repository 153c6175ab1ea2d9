"""Client side of sscd-triton: embed image collections through a Triton server.

    sscd-embed photos/ --url 127.0.0.1:8001 --output runs/photos-emb
    python -c "from sscd_triton import load_embeddings; print(load_embeddings('runs/photos-emb')[1].shape)"

Modules (flat, small): `sscd_triton.cli.embed` (the CLI: arguments, model facts and
identity, the one cleanup path), `pipeline` (units of work and partitions, reading,
batching, dispatch), `transport` (endpoints, retries, splitting rejected batches, shared
memory), `sources` (lazy input enumeration, partitions of listings), `idset` (compact
set of seen ids), `io` (Parquet shards written off the event loop, done-markers, model
identity, `.npz`, `load_embeddings`), `parity_check` (the only module that imports
torch) and `postprocess` (centering, PCA whitening, score normalisation; numpy only).
"""
