"""`python -m backend`: the same as `tollgate backend`."""

import sys

from backend.main import main

sys.exit(main())
