"""``python -m healthcode.cli``: the same as the ``healthcode`` console script."""

import sys

from healthcode.cli.main import main

sys.exit(main())
