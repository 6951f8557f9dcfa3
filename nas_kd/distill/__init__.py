"""Knowledge distillation: the registry of losses and feature keys (`losses`), distilling a student
from the ensemble's targets (`student`), and block-wise supervision against one teacher
(`blockwise`)."""
