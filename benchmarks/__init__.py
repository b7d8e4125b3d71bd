"""fusionct: benchmarks."""
