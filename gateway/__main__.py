"""`python -m gateway`: the same as the `tollgate` command."""

import sys

from gateway.cli import main

sys.exit(main())
