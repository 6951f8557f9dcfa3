"""After the search: the winner retrained with the full schedule, tested and exported (`retrain`),
the online ensemble of students (`online`), and the pruned-teacher baseline (`prune`, `baselines`)."""
