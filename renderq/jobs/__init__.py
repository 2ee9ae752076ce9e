"""Jobs: their lifecycle, the retry policy, one attempt, submissions and the maintenance sweeps."""
