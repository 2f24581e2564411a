"""``python -m dualsearch``, and the file spark-submit runs: ``spark-submit ... dualsearch/__main__.py index ...``."""
import sys

from dualsearch.cli import main

if __name__ == "__main__":
    sys.exit(main())
