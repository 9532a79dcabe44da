"""Uncertainty weighting recovers the noise levels of two regression tasks.

Two tasks share one linear model, ``y_k = x w + N(0, sigma_k^2)``. With a mean-squared-error
loss, uncertainty weighting's learned log-variance ``s_k`` has its fixed point at
``exp(s_k) = L_k``, and at the optimum ``L_k`` is the noise variance ``sigma_k^2``: so after
training ``exp(s_1 - s_2)`` estimates ``sigma_1^2 / sigma_2^2``. The script trains with the
one-backward path (`mtl.weighted_value_and_grad`) and prints the recovered and true ratios::

    python examples/uncertainty_noise_ratio.py --sigma1 0.5 --sigma2 2.0 --steps 600
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import mtl_jax as mtl


def run(
    sigma1: float = 0.5,
    sigma2: float = 2.0,
    n: int = 4000,
    dim: int = 8,
    steps: int = 600,
    lr: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """Trains the shared model with uncertainty weighting; returns recovered vs true ratios.

    Returns:
      ``true_ratio`` (sigma1^2 / sigma2^2), ``recovered_ratio`` (exp(s1 - s2)),
      ``empirical_ratio`` (ratio of the realized noise variances), ``variances``
      (exp(s_k)), and the final losses.
    """
    kx, kw, k1, k2 = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (n, dim))
    w_true = jax.random.normal(kw, (dim,))
    noise1 = sigma1 * jax.random.normal(k1, (n,))
    noise2 = sigma2 * jax.random.normal(k2, (n,))
    y = jnp.stack([x @ w_true + noise1, x @ w_true + noise2], axis=1)

    def loss_fn(params):
        pred = x @ params["w"] + params["b"]
        return jnp.mean((pred[:, None] - y) ** 2, axis=0)  # [2] per-task MSE

    # The log-variances learn with the same Adam as the model (as LibMTL, where they are
    # model parameters).
    lw = mtl.uncertainty_weighting_weighting(num_tasks=2, optimizer=optax.adam(lr))
    value_and_grad = mtl.weighted_value_and_grad(loss_fn, lw)
    opt = optax.adam(lr)
    params = {"w": jnp.zeros((dim,)), "b": jnp.zeros(())}
    opt_state, lw_state = opt.init(params), lw.init()

    @jax.jit
    def step(params, opt_state, lw_state):
        (losses, _, lw_state), grads = value_and_grad(lw_state, params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, lw_state, losses

    for _ in range(steps):
        params, opt_state, lw_state, losses = step(params, opt_state, lw_state)
    s = lw_state.log_vars
    return {
        "true_ratio": sigma1**2 / sigma2**2,
        "recovered_ratio": float(jnp.exp(s[0] - s[1])),
        "empirical_ratio": float(jnp.var(noise1) / jnp.var(noise2)),
        "variance_1": float(jnp.exp(s[0])),
        "variance_2": float(jnp.exp(s[1])),
        "loss_1": float(losses[0]),
        "loss_2": float(losses[1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigma1", type=float, default=0.5)
    parser.add_argument("--sigma2", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    r = run(args.sigma1, args.sigma2, steps=args.steps, seed=args.seed)
    print(f"true noise variances:      {args.sigma1**2:.4f} {args.sigma2**2:.4f}")
    print(f"recovered exp(s_k):        {r['variance_1']:.4f} {r['variance_2']:.4f}")
    print(f"true ratio sigma1^2/sigma2^2: {r['true_ratio']:.4f}")
    print(f"recovered ratio exp(s1-s2):   {r['recovered_ratio']:.4f}")
    print(f"realized noise ratio:         {r['empirical_ratio']:.4f}")


if __name__ == "__main__":
    main()
