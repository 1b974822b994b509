"""The model side of Tag-LLM: tag vectors spliced in through hooks on the base's own input embedding (tags), the heads
and the loss (model), the ridge maths the probe start and the closed-form head share (ridgehead). Imports nothing
else of tagscale.
"""
