"""Copy detection on SSCD descriptors: search, near-duplicate groups, postprocessing,
metrics and the edited-photo copy-detection set. numpy (faiss and pyarrow where asked),
never the client or a server.

Modules: `search` (exact streamed / faiss top-k), `dedup` (pairs, groups,
representatives), `tables` (CSV/Parquet outputs), `postprocess` (centering, PCA
whitening, score normalisation), `metrics` (DISC 2021 uAP, accuracy@1, PR curves),
`copyset` (the edited-photo copy-detection set of the demo and the int8 report).
"""
