"""fusionct: kernels."""
