"""The tensor path's programs: index-notation costs, and scalar costs run on that path
(numbered families restated in index notation; methods only it has, such as newton-cg; fits
over Dask data the scalar loop does not run), behind the scalar cost's data forms."""

from __future__ import annotations

from ..dataset import as_dataset, is_dask
from ..program import _as_x0
from .statement import is_tensor_cost


def lifted(cost):
    """(the restated tensor cost, its columns) for a scalar cost of many parameters in numbered
    families (tensor/lift.py), else None."""
    from .statement import LIFT_MIN_PARAMS

    if is_tensor_cost(cost) or len(cost.params) < LIFT_MIN_PARAMS:
        return None
    from .lift import lifted_for

    return lifted_for(cost)


def tensor_program(cost, opt, sched, batch, batch_size):
    """The tensor path's program: index-notation costs, and methods only it has (newton-cg)
    for scalar costs, restated as a tensor cost of scalar parameters."""
    from .optimize import program_for_tensor

    from .model import TensorCost

    if not isinstance(cost, TensorCost):
        found = lifted(cost)
        if found is not None:  # numbered families restated in index notation
            tcost, columns = found
        else:
            tcost, columns = TensorCost(cost.expr, list(cost.params), list(cost.data), cost.reduce), None
        prog = program_for_tensor(tcost, opt, sched, batch)
        prog.scalar_cost = cost
        return ScalarFront(prog, columns)
    prog = program_for_tensor(cost, opt, sched, batch)
    prog.notes_batch_default = batch_size is None and batch is not None
    return prog


class ScalarFront:
    """A tensor program run on a scalar cost's data forms (dict, 2-D array, DataFrame, and
    their Dask forms)."""

    def __init__(self, prog, columns=None):
        self.prog = prog
        self.cost = prog.scalar_cost
        self.optimizer = prog.optimizer
        self.columns = columns  # the restated cost's data from the scalar columns (tensor/lift.py)

    def __getattr__(self, name):
        return getattr(self.prog, name)

    def run(self, x0, data=None, **kw):
        if self.cost.data and is_dask(data):  # each chunk restated where it is evaluated
            from ..dask_data import DaskFit

            data = DaskFit(self.prog.cost, data, self.cost.data_names, self.columns)
        elif self.cost.data:
            ds = as_dataset(data, self.cost.data_names)
            if self.columns is not None:
                from .lift import lifted_data

                data = lifted_data(self.columns, ds)
            else:
                data = dict(zip(self.cost.data_names, ds.columns))
        if not isinstance(x0, dict):
            x0 = _as_x0(self.cost, x0)
        res = self.prog.run(x0, data, **kw)
        res.params = dict(zip(self.cost.param_names, res.x.tolist()))  # the scalar names
        return res
