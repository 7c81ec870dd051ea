"""The GEMV tests share ``gemv_helpers`` (this directory); pytest's importlib mode puts no test directory on
``sys.path``, so it is added here."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
