"""fusionct: flows."""
