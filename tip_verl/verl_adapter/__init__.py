"""verl glue for tip_verl. Importing this package imports verl; the TIP core in ``tip_verl`` does not."""
