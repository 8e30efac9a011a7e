"""How a job is started and restarted: the process topology from SLURM, requeue on the time-limit signal."""
