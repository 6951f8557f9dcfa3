"""The whole run (`run`), in phases a reader can name (`phases`: prepare, open the run, teach; then
the trials and the retrain in `run`): every setting checked first (`checks`), the time plan that
splits a time budget between the search and the retrain (`plan`), and the run's record in its study,
so that the same command after an interruption does only what is left (`resume`)."""
