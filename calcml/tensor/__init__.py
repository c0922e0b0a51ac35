"""Costs in index notation (``cm.params("W", shape=...)``, ``cm.sum``, ``cm.logsumexp``): the
statement, derivatives in index form, the planned kernels and the optimizers over them.

Nothing is imported here: ``import calcml`` stays light, and the tensor machinery loads when a
tensor cost (or a scalar cost restated as one) first needs it.
"""
