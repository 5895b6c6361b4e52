"""Benchmarks that print numbers (speed and memory live here, never in timed tests).

    python -m poweropd.bench kernels    # 1. lm-head kernels: naive vs chunked vs fused
    python -m poweropd.bench step       # 2. one OPD step: sampled-token vs full-vocab
    python -m poweropd.bench overhead   # 3. the harness vs a bare loop on the toy pair
    python -m poweropd.bench scaling    # 4. update time and memory as length / batch double

Every benchmark prints its table, and with `--json PATH` writes the rows, the command and
the machine to PATH and the table to PATH with a .md suffix (docs/bench/ keeps ours).
"""
