"""Data: documents -> tokens -> packed sequences that remember document boundaries.

  sources.py     reading documents (stdlib, local files, saved datasets, prepared folders)
  tokenizers.py  byte-level and `tokenizer.json` tokenizers
  prepare.py     `longtrain prepare`: tokenize once into a folder (format: prepared.py)
  prepared.py    prepared folders, memory-mapped; the cache of prepared sources
  corpus.py      samples from one source or a weighted mixture (the sampling rule resume relies on)
  batches.py     micro-batches with document bounds, prefetched in the background

Training never holds documents: sources are tokenized once into prepared folders and read
through memory maps.
"""
