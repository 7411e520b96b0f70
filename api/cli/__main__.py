"""``python -m api.cli`` is ``medrag``."""

import sys

from api.cli import main

sys.exit(main())
