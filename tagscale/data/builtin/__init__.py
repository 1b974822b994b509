"""The built-in domains, one module each (molecules, proteins, language, tdc), over what they share (common) and the
scaffold split (scaffold). The registry and the prepared-file cache are tagscale.data.sources."""
