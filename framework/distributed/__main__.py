"""``python -m framework.distributed``: a spawned worker rank; its ``WorkerSpec`` comes as JSON on stdin."""

import sys

from framework.distributed.worker import run_worker, spec_from_json

if __name__ == "__main__":
    run_worker(spec_from_json(sys.stdin.read()))
