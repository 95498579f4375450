"""``python -m bench``: the same harness as ``inventory bench``."""

import sys

from bench.harness import main

sys.exit(main(sys.argv[1:]))
