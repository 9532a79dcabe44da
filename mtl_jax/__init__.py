"""mtl_jax: multi-task optimization in JAX.

Task-balancing methods (MGDA, PCGrad, CAGrad, Nash-MTL, UPGrad, uncertainty weighting, FAMO,
...) as composable optax transforms over per-task Jacobians::

    import mtl_jax as mtl
    (losses, aux), jac = mtl.value_and_jacobian(loss_fn, has_aux=True)(params, batch)
    tx = optax.chain(mtl.upgrad(), mtl.sum_tasks(), optax.adam(1e-3))
"""

from mtl_jax import mixing, solvers
from mtl_jax.jacobian import (
    STRATEGIES,
    auto_strategy,
    combination_weights,
    combine_rows,
    gramian,
    jacobian_rows,
    num_tasks,
    scale_rows,
    value_and_gramian,
    value_and_jacobian,
    weighted_sum,
)
from mtl_jax.registry import BALANCERS, JACOBIAN_METHODS, LOSS_METHODS, build_chain, get_balancer
from mtl_jax.representation import RepresentationStep, representation_value_and_grad
from mtl_jax.solvers import min_norm_simplex, project_simplex
from mtl_jax.transforms.aligned import aligned_mtl, aligned_mtl_weights
from mtl_jax.transforms.base import (
    Reducible,
    RowCombination,
    TaskReducer,
    chain,
    gramian_weighting,
    label_by_path,
    mean_tasks,
    scalarize,
    shared_only,
    sum_tasks,
)
from mtl_jax.transforms.cagrad import cagrad, cagrad_weights
from mtl_jax.transforms.config import conflict_free, conflict_free_weights
from mtl_jax.transforms.db_mtl import db_mtl, db_mtl_weighting
from mtl_jax.transforms.dual_cone import dualproj, dualproj_weights, upgrad, upgrad_weights
from mtl_jax.transforms.excess_mtl import excess_mtl, excess_mtl_weighting
from mtl_jax.transforms.fairgrad import fairgrad, fairgrad_weights
from mtl_jax.transforms.famo import famo, famo_weighting
from mtl_jax.transforms.finite import (
    SkipIfNonfiniteState,
    all_finite,
    skip_if_nonfinite,
    task_finite,
)
from mtl_jax.transforms.flat import f_mtl, f_mtl_value_and_jacobian
from mtl_jax.transforms.fuller import fuller, fuller_task_weights
from mtl_jax.transforms.graddrop import graddrop
from mtl_jax.transforms.gradnorm import (
    dense_grad_norms,
    gradnorm,
    gradnorm_dense_value_and_grad,
    gradnorm_value_and_grad,
    gradnorm_weighting,
    task_grad_norms,
)
from mtl_jax.transforms.imtl import imtl_g, imtl_g_weights
from mtl_jax.transforms.loss_base import (
    LossWeighting,
    from_loss_weighting,
    weighted_value_and_grad,
)
from mtl_jax.transforms.loss_weighting import (
    dwa,
    dwa_weighting,
    gls,
    gls_weighting,
    imtl_l,
    imtl_l_weighting,
    rlw,
    rlw_weighting,
    stch,
    stch_weighting,
    uncertainty_weighting,
    uncertainty_weighting_weighting,
)
from mtl_jax.transforms.mgda import mgda, mgda_weights
from mtl_jax.transforms.nash_mtl import nash_mtl, nash_mtl_weights
from mtl_jax.transforms.pcgrad import gradvac, pcgrad, pcgrad_weights
from mtl_jax.transforms.rep_mtl import rep_mtl_loss, rep_mtl_regularizer
from mtl_jax.transforms.robust import krum, krum_weights, trimmed_mean
from mtl_jax.transforms.schedules import task_schedule, task_schedule_weighting
from mtl_jax.transforms.seed_loss import (
    adaptive_task_balancing,
    adaptive_task_balancing_weighting,
    adaptive_task_balancing_weights,
    coba,
    coba_weighting,
    igb,
    igb_weighting,
    inverse_variance,
    inverse_variance_weighting,
    log_class_scaling,
    log_class_scaling_weighting,
    median_normalize,
    median_normalize_weighting,
    worst_task,
    worst_task_weighting,
)
from mtl_jax.transforms.sparse import sparse_training
from mtl_jax.transforms.stochastic import cross_gramian, moco, modo, sdmgrad

__version__ = "0.1.0"

__all__ = [
    "LossWeighting",
    "from_loss_weighting",
    "weighted_value_and_grad",
    "BALANCERS",
    "JACOBIAN_METHODS",
    "LOSS_METHODS",
    "STRATEGIES",
    "auto_strategy",
    "build_chain",
    "combination_weights",
    "combine_rows",
    "get_balancer",
    "gramian",
    "Reducible",
    "RowCombination",
    "TaskReducer",
    "chain",
    "gramian_weighting",
    "jacobian_rows",
    "label_by_path",
    "mean_tasks",
    "min_norm_simplex",
    "num_tasks",
    "project_simplex",
    "scalarize",
    "scale_rows",
    "shared_only",
    "solvers",
    "sum_tasks",
    "value_and_gramian",
    "value_and_jacobian",
    "weighted_sum",
    # non-finite guards
    "SkipIfNonfiniteState",
    "all_finite",
    "skip_if_nonfinite",
    "task_finite",
    # -- Jacobian-level methods (issue 4) --
    # part A
    "RepresentationStep",
    "aligned_mtl",
    "aligned_mtl_weights",
    "conflict_free",
    "conflict_free_weights",
    "dualproj",
    "dualproj_weights",
    "imtl_g",
    "imtl_g_weights",
    "krum",
    "krum_weights",
    "mgda",
    "mgda_weights",
    "representation_value_and_grad",
    "trimmed_mean",
    "upgrad",
    "upgrad_weights",
    # part B
    "cagrad",
    "cagrad_weights",
    "cross_gramian",
    "fairgrad",
    "fairgrad_weights",
    "graddrop",
    "gradvac",
    "moco",
    "modo",
    "nash_mtl",
    "nash_mtl_weights",
    "pcgrad",
    "pcgrad_weights",
    "sdmgrad",
    # part C
    "f_mtl",
    "f_mtl_value_and_jacobian",
    "fuller",
    "fuller_task_weights",
    "rep_mtl_loss",
    "rep_mtl_regularizer",
    "sparse_training",
    # -- loss-level methods (issue 5) --
    # part E
    "adaptive_task_balancing",
    "adaptive_task_balancing_weighting",
    "adaptive_task_balancing_weights",
    "coba",
    "coba_weighting",
    "igb",
    "igb_weighting",
    "inverse_variance",
    "inverse_variance_weighting",
    "log_class_scaling",
    "log_class_scaling_weighting",
    "median_normalize",
    "median_normalize_weighting",
    "mixing",
    "task_schedule",
    "task_schedule_weighting",
    "worst_task",
    "worst_task_weighting",
    # part D
    "db_mtl",
    "db_mtl_weighting",
    "dwa",
    "dwa_weighting",
    "excess_mtl",
    "excess_mtl_weighting",
    "famo",
    "famo_weighting",
    "gls",
    "gls_weighting",
    "gradnorm",
    "gradnorm_weighting",
    "gradnorm_value_and_grad",
    "gradnorm_dense_value_and_grad",
    "dense_grad_norms",
    "imtl_l",
    "imtl_l_weighting",
    "rlw",
    "rlw_weighting",
    "stch",
    "stch_weighting",
    "task_grad_norms",
    "uncertainty_weighting",
    "uncertainty_weighting_weighting",
]
