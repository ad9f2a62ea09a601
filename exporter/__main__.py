"""``python -m exporter``: the same as the ``mqtt-site-exporter`` command."""
import sys

from .cli import main

sys.exit(main())
