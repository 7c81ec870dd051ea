import sys

from framework.entrypoints.cli import main

sys.exit(main())
