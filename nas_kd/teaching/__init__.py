"""The teachers: trained once and cached or shipped (`cache`), a model the user already has as an ONNX
or torch.export file (`files`), the offline ensemble whose soft targets and features the students
learn from (`ensemble`), and its targets kept on disk across runs (`stored`)."""
