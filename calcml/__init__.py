"""calcml: exact symbolic derivatives of machine-learning costs, compiled with Numba."""

from ._version import __version__ as __version__
from .compile import Kernels as Kernels, compile as compile
from .cost import Cost as Cost, data as data, params as params
from .errors import (
    CacheError as CacheError,
    CalcmlError as CalcmlError,
    CodegenError as CodegenError,
    CostError as CostError,
    DataError as DataError,
    ParamError as ParamError,
)
from .functions import dot as dot, relu as relu, sigmoid as sigmoid, softplus as softplus
from .dataset import Dataset as Dataset
from .check import check_gradient as check_gradient
from .verify import verify as verify, verify_derivative as verify_derivative
from . import optim as optim, schedules as schedules
from .errors import OptimizeError as OptimizeError
from .minimize import generate as generate, minimize as minimize
from .result import OptimizeResult as OptimizeResult
from .errors import ParseError as ParseError
from .parse import parse as parse
from .interop import to_scipy as to_scipy
from .plot import plot_path as plot_path
from .tensor.statement import rowwise as rowwise
from .tensor.statement import index as index, logsumexp as logsumexp, onehot as onehot, tsum as sum  # noqa: A001
