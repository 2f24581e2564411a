"""``python -m dualsearch.cli`` (as ``python -m dualsearch``)."""
import sys

from dualsearch.cli import main

sys.exit(main())
