#!/usr/bin/env python
"""Prepare DAPO-Math-17k / MATH-500 / AIME 2024 / AIME 2025 as verl parquet (see tip_verl.tools.math_data)."""

import os
import sys

try:
    from tip_verl.tools.math_data import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tip_verl.tools.math_data import main

if __name__ == "__main__":
    sys.exit(main())
