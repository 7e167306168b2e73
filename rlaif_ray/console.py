"""What the user's console shows. With `output.console=quiet` (the default) every stage actor sends its own output
(vLLM's engine logs, DeepSpeed's and transformers' messages, warnings) to `run_dir/logs/<stage>-<index>.log`, so the
console holds the driver's progress bar and `[rlaif]` lines; `output.console=all` leaves it where Ray sends it (the
driver's console). Errors still reach the driver: a failing actor's exception comes back through Ray.

The redirect is at the file-descriptor level, so output from C++ (vLLM's CPU kernels, gloo) goes there too. On a
cluster each node writes the logs of its actors under its own `run_dir` (a shared file system gathers them).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def stage_output_to_run_folder(cfg, name: str) -> Path | None:
    """Send this process's stdout and stderr to run_dir/logs/<name>.log (appending) unless `output.console=all`;
    returns the log file's path (None: not redirected)."""
    if cfg.output.console == "all":
        return None
    folder = Path(cfg.output.run_dir).expanduser() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    log = open(path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    return path.resolve()
