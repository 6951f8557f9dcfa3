"""What a study shows: its trials and Pareto fronts as data (`fronts`), one self-contained HTML
report (`html`), and the lines a search prints as it goes and when it ends (`summary`)."""
