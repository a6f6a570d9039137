"""Load-time benchmarks: tp_loader against its peers and the raw-read limit (see README.md here)."""
