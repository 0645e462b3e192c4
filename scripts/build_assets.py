#!/usr/bin/env python
"""Build (or reuse) tip_verl's tiny assets: see ``python scripts/build_assets.py --help``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tip_verl.assets.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
