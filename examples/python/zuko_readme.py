"""zuko's README example with flows: a conditional neural spline flow of three features
given five, fitted by maximum likelihood, then sampled at one condition.

    python examples/python/zuko_readme.py
"""

import numpy as np

import flows

# Data: x depends on c through a fixed random linear map and a non-linearity.
rng = np.random.default_rng(0)
c = rng.normal(size=(8192, 5))
w = rng.normal(size=(5, 3))
x = np.tanh(c @ w) + 0.1 * rng.normal(size=(8192, 3))

# zuko.flows.NSF(3, 5, transforms=3, hidden_features=[128] * 3): autoregressive splines.
flow = flows.Flow(3, context=5, flow="nsf-ar", layers=3, hidden=128, hidden_layers=3)

# Train to maximise the log-likelihood (Adam, as zuko's loop does).
flow.fit(x, context=c, steps=300, batch=256, lr=1e-3, seed=0)

# Sample 64 points x ~ p(x | c*).
c_star = rng.normal(size=(1, 5))
samples = flow.sample(64, context=c_star, seed=0)
print(samples.shape, "mean", samples.mean(0).round(2), "expected", np.tanh(c_star @ w).round(2)[0])
print("log p(x | c*) of the samples:", flow.log_prob(samples, context=c_star)[:4].round(2))
