"""The quantization tests share two helper modules of this directory, ``quant_harness`` and
``reference_formats``; pytest's importlib mode puts no test directory on ``sys.path``, so it is added here."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
