"""Training benchmarks of rlopt (run from the repository root; see benchmarks/README.md)."""
