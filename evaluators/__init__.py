"""difftune.evaluators: latency, memory, FLOPs and quality metrics, calibration sets, reference cache."""
