"""`python3 -m amends --check-vectors specs/vectors/routing.json`: checks
the routing against the published vectors (needs no server)."""

import sys

from .routing import main

sys.exit(main())
