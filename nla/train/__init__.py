"""What the trainers share: the row stream and optimizer step, checkpoints, processes, the RL step."""
