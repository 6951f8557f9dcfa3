"""A student on its device: ONNX conversion (`convert`), int8 settings per CPU (`int8`), memory
(`memory`), the layers of a latency table (`layers`), latency measured or predicted (`latency`),
the delivered files (`export`), and the standalone timing script a device runs (`time_blocks`)."""
