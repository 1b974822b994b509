"""Scores: evaluation sets, sharded inference, bootstrap intervals and the probe start (evaluate), validation's choice
of the kept step (selection), tags composed on new inputs (predict).
"""
