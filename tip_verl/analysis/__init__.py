"""Looking at what TIP selected: per-token records written during training and the taxonomy report.

- :mod:`.records` — :class:`~tip_verl.analysis.records.TokenRecordWriter` (``+tip.records_every=N``: a sample of
  per-token rows, the step's thresholds and quadrant shares, all taken from the step's ``TIPSelection``) and
  the readers.
- :mod:`.report` — :func:`~tip_verl.analysis.report.make_report`: three PNGs and tables from a records
  directory, built from :mod:`.data` (aggregates, quadrant tables), :mod:`.text_view` (sampled responses,
  kept tokens marked) and :mod:`.figures` (matplotlib); :mod:`.cli` — ``tip-verl-report RECORDS_DIR``.

Needs pandas / pyarrow (records) and matplotlib (figures); never imports verl. Importing this package
imports nothing.
"""
