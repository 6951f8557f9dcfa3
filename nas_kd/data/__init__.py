"""Datasets as whole tensors in memory with fixed splits (`datasets`), and the batches drawn from
them: shuffled, normalised and augmented on whole batches (`batches`)."""
