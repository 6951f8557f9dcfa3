"""The search: what a trial stores (`records`), training-free scores (`proxies`), the budget's bounds
(`budget`), candidates at the budget's edge (`edge`), start points (`start`), one trial
(`objective`), the Optuna study (`study`) and which trials go on (`picks`)."""
