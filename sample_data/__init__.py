"""fusionct: sample_data."""
