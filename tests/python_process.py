"""A fresh Python process for tests of what only a new interpreter shows (import-time work, peak
memory, the exit): this interpreter, importing what this one imports."""

import os
import subprocess
import sys


def child_env(drop: tuple[str, ...] = ()) -> dict:
    """This process's environment without the variables in `drop`, with its import path."""
    env = {name: value for name, value in os.environ.items() if name not in drop}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (*sys.path, env.get("PYTHONPATH", "")) if p)
    return env


def run_python(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`python *args` in a new process (`-c CODE ...` or a script path), output captured as text."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=child_env() if env is None else env, **kwargs)
