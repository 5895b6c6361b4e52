"""The one error type the harness reports to a user as a single line (run.py and evaluate.py
print it as `error: ...` and exit with status 2). Kept in its own module so that the
config schema, the objective registry and the engines can all raise it without importing
each other."""


class ConfigError(ValueError):
    """A config or set-up problem, reported to the user as one line naming the key and the fix."""
