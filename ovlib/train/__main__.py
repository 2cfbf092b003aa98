"""``python -m ovlib.train`` (see :mod:`ovlib.train.launch`)."""

import sys

from ovlib.train.launch import main

sys.exit(main())
