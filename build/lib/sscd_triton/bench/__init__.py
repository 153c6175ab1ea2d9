"""The benchmark behind benchmarks/bench.py (sscd_triton.cli.bench parses and orders):
common (inputs, the Row record), device (what ran it), local (in-process rows), served
(Triton rows and the local server), reporting (tables and JSON)."""
