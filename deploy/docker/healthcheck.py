"""Container health check for the SegQuant Serve image (stdlib only; runs as the image's HEALTHCHECK).

One image runs two roles, so the check looks at the container's own ``segquant`` process to pick its target:

* ``segquant serve``  -> ``GET http://127.0.0.1:<port>/healthz`` (``--port``, else ``SEGQUANT_PORT``, else 8000)
* ``segquant worker`` -> ``GET http://127.0.0.1:<port>/metrics`` on the worker's metrics port
  (``--metrics-port``, else ``SEGQUANT_WORKER__METRICS_PORT``). Workers have no HTTP API; their Prometheus
  endpoint is the only thing that answers. A worker without a metrics port counts as healthy while its
  process is alive.

Exit status 0 = healthy, 1 = unhealthy (Docker's HEALTHCHECK contract).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_API_PORT = 8000
TIMEOUT_S = 4.0


def segquant_argv(proc: Path = Path("/proc")) -> list[str]:
    """The argv of the first ``segquant`` process in this container (PID order), or [] if none is found."""
    pids = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit()) if proc.is_dir() else []
    for pid in pids:
        try:
            raw = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if _command_index(argv) is not None:
            return argv
    return []


def _command_index(argv: list[str]) -> int | None:
    """Index of the ``segquant`` entry point in ``argv`` (plain, a path, or ``python -m segquant_cli``)."""
    for i, arg in enumerate(argv):
        if os.path.basename(arg) == "segquant" or (arg == "segquant_cli" and i > 0 and argv[i - 1] == "-m"):
            return i
    return None


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def target_url(argv: list[str], env: dict[str, str]) -> str | None:
    """The URL that tells whether the process described by ``argv`` is healthy (None: nothing to ask)."""
    start = _command_index(argv)
    args = argv[start + 1 :] if start is not None else []
    role = next((a for a in args if not a.startswith("-")), "serve")
    if role == "worker":
        port = _option(args, "--metrics-port") or env.get("SEGQUANT_WORKER__METRICS_PORT")
        if not port or int(port) == 0:
            return None
        return f"http://127.0.0.1:{int(port)}/metrics"
    port = _option(args, "--port") or env.get("SEGQUANT_PORT") or str(DEFAULT_API_PORT)
    return f"http://127.0.0.1:{int(port)}/healthz"


def check(url: str | None, timeout: float = TIMEOUT_S) -> bool:
    if url is None:
        return True
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    """``healthcheck.py`` (inspects the container) or ``healthcheck.py segquant serve --port 8000`` (explicit)."""
    target = argv if argv else segquant_argv()
    url = target_url(target, dict(os.environ))
    ok = check(url)
    if not ok:
        sys.stderr.write(f"unhealthy: {url} did not answer 2xx\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
