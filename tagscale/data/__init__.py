"""Records to batches: the built-in sources (sources), reading and checking record files (records), the fields a
template names (fields), encoding, caching and length-bucketed batching (encode).
"""
