"""The scaling study, not the trainer: shapes and the memory/throughput planner (planner), the sweep of runs (sweep),
reading its runs back and fitting trends (scaling), the report (report), the expert baseline (expert) and the three-
stage demo (demo).
"""
