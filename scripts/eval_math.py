#!/usr/bin/env python
"""mean@n evaluation (default mean@16 at temperature 1.0) of a model on math parquet files (see tip_verl.tools.eval_math)."""

import os
import sys

try:
    from tip_verl.tools.eval_math import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tip_verl.tools.eval_math import main

if __name__ == "__main__":
    sys.exit(main())
