"""lm-evaluation-harness task definitions of the poweropd benchmarks (YAML + hooks)."""
