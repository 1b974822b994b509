"""Scores: held-out and validation sets (sets), sharded inference (inference), metrics with bootstrap intervals
(scoring), the ridge maths (ridge), the linear probe and probe-started heads (probe), tables (tables), a run's
evaluation before and after training and its command line (evaluate), validation's choice of the kept step
(selection), tags composed on new inputs (predict).
"""
