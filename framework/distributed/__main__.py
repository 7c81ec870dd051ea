"""``python -m framework.distributed``: a spawned worker rank; its ``WorkerSpec`` comes as JSON on stdin.

The driver owns a spawned worker's lifetime: it stops the worker with a SHUTDOWN message (then SIGKILL if
that fails), and the worker exits by itself within half a second of the driver's death. So the worker ignores
SIGTERM and SIGINT: `docker stop`, systemd, `timeout` or Ctrl-C signal the whole process group, and a worker
that died first would break the driver's orderly shutdown (its SHUTDOWN broadcast would fail mid-way).
"""

import signal
import sys

from framework.distributed.worker import run_worker, spec_from_json

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_worker(spec_from_json(sys.stdin.read()))
