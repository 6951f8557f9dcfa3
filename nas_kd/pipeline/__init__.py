"""The whole run in its phases (`run`) and the time plan that splits a time budget between the
search and the retrain (`plan`)."""
