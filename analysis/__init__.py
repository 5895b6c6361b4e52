"""Run directories -> DataFrames -> the paper's figures and tables.

    python -m analysis.report outputs/sweeps/<sweep> --out reports/<name>   # everything, as report.md
    python -m analysis.heatmaps --out figures                              # Fig 5 (analytic, no runs)

`analysis.load` finds runs by their saved Hydra config (never by directory or W&B run
names), `analysis.figures` / `analysis.heatmaps` draw, `analysis.tables` builds Tables
2-4, `analysis.report` puts them together.
"""
