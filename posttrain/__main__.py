"""`python -m posttrain …` runs the CLI (also what `accelerate launch -m posttrain …` calls)."""

import sys

from posttrain.cli import main

sys.exit(main())
