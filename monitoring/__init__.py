"""Serving-side monitoring: prediction log, latency, drift, and the re-optimization policy."""
