"""Records to batches: the built-in domains (builtin/) with their registry and cache (sources), reading and checking
record files (records), the fields a template names (fields), encoding (encode), the encoded cache (encoded_cache),
sampling, length-bucketed micro-batches and collation (batches), and a run's training and validation data
(train_data).
"""
