"""The inference engine: runtime sessions, batching on lanes, admission, the classifier."""
