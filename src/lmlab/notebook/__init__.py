"""The lab notebook: decisions carried from one experiment into the next (``lmlab adopt``, a
baseline file that a later spec extends) and the index of a directory of experiments with their
lineage (``lmlab notebook``). Reads stores and reports; never trains or plans."""
