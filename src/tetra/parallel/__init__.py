"""4D hybrid parallelism (the AxoNN algorithm): data x depth x row x column on torch.distributed.

Entry points: ProcessGrid (grid.py) and parallelize(model, grid) (parallelize.py).
"""
