"""Networks as data: the `Spec` of a student and the network built from it (`arch`), what it costs
(`cost`), the teacher zoo written as specs (`zoo`), the YAML search spaces (`space`) and weights on
disk (`weights`)."""
