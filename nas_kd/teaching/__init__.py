"""The teachers: trained once and cached or shipped (`cache`), and the offline ensemble whose soft
targets and features the students learn from (`ensemble`)."""
