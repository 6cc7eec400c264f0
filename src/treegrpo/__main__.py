"""`python -m treegrpo ...`, the form `accelerate launch -m treegrpo train ...` needs."""

import sys

from treegrpo.cli import main

sys.exit(main())
