"""Command-line tools around OPD with TIP: math data preparation and mean@n evaluation.

* :mod:`tip_verl.tools.math_data` -- DAPO-Math-17k / MATH-500 / AIME 2024 / AIME 2025 files -> verl parquet.
* :mod:`tip_verl.tools.eval_math` -- mean@n (default mean@16 at temperature 1.0) with verl's math scorer.
"""
