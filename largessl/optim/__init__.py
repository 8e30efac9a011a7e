"""Parameter groups and schedules (`config` imports no torch)."""
