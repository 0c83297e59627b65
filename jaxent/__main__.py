"""``python -m jaxent``: the same command line as ``jaxent`` (``jaxent.cli.main``)."""
import sys

from jaxent.cli import main

if __name__ == "__main__":
  sys.exit(main())
