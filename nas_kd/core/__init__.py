"""The ground every other part stands on: the one error type for bad input (`errors`), the versions
saved files record (`versions`), units read and written one way (`units`: counts, bytes, durations,
latencies), progress lines on stderr (`progress`) and the typed configuration users write (`config`)."""
