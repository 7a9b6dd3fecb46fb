"""`python -m harmonization ...` runs the `harmonization` command."""

import sys

from harmonization.cli import main

if __name__ == "__main__":
    sys.exit(main())
