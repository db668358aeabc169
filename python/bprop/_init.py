"""Initial weights, shared by bprop.Network and the NumPy reference so that the
same seed gives the same network in both."""

from __future__ import annotations

import numpy as np

RELU_FAMILY = ("relu", "leaky_relu", "gelu")


def initial_parameters(specs, dtype, seed):
    """Draws (weight, bias) for each layer spec (in, out, activation, negative_slope).

    He-normal for the relu family, std = gain / sqrt(in) with gain^2 = 2 / (1 + slope^2)
    (slope 0 for relu and gelu); Glorot-uniform otherwise, limit sqrt(6 / (in + out)).
    Biases start at zero. Draws are float64 from NumPy's PCG64, then cast, so the
    bits depend only on the seed and the architecture.

    Returns:
        list of (weight (in, out), bias (out,)) arrays of `dtype`.
    """
    rng = np.random.default_rng(seed)
    params = []
    for n_in, n_out, activation, slope in specs:
        if activation in RELU_FAMILY:
            gain2 = 2.0 / (1.0 + (slope**2 if activation == "leaky_relu" else 0.0))
            W = rng.standard_normal((n_in, n_out)) * np.sqrt(gain2 / n_in)
        else:
            limit = np.sqrt(6.0 / (n_in + n_out))
            W = rng.uniform(-limit, limit, size=(n_in, n_out))
        params.append((W.astype(dtype), np.zeros(n_out, dtype=dtype)))
    return params
