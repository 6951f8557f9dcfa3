"""Training primitives shared by teachers and students: optimiser, schedule, the loop,
evaluation and checkpoints (`train`)."""
