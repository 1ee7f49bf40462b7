"""Evaluation: scoring a model (perplexity by position, passkey retrieval), reports, the CLI.

  score.py    held-out documents, the Scorer (sharded over sp like training), in-training eval
  passkey.py  passkey prompts and the passkey documents mixed into training data
  report.py   tables and heat maps
  cli.py      `longtrain eval`
"""
