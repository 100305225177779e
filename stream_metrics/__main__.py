"""``python -m stream_metrics``: the same command line as ``stream-metrics``."""
import sys

from .cli import main

sys.exit(main())
