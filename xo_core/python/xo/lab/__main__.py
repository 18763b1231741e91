"""``python -m xo.lab up|down|status ...``"""

import sys

from xo.lab.cli import main

sys.exit(main())
