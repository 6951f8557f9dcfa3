"""The whole run in its phases (`run`): every setting checked first (`checks`), the time plan that
splits a time budget between the search and the retrain (`plan`), and the run's record in its study,
so that the same command after an interruption does only what is left (`resume`)."""
