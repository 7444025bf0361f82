"""Serving-side monitoring: prediction log, latency, drift, live quality from label feedback, and the
re-optimization policy."""
