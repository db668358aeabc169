"""Initial weights, shared by bprop.Network and the NumPy reference so that the
same seed gives the same network in both."""

from __future__ import annotations

import numpy as np

from .activations import REGISTRY


def initial_parameters(specs, dtype, seed):
    """Draws (weight, bias) for each layer spec (in, out, activation, negative_slope).

    He-normal where the activation's registry row gives a gain (the relu family),
    std = gain / sqrt(in) (gain^2 = 2 / (1 + slope^2) for leaky_relu, 2 for relu,
    gelu, elu, silu and softplus, 1 for selu: LeCun-normal); Glorot-uniform otherwise, limit sqrt(6 / (in + out)).
    Biases start at zero. Draws are float64 from NumPy's PCG64, then cast, so the
    bits depend only on the seed and the architecture.

    Yields:
        (weight (in, out) float64, bias (out,) of `dtype`) per layer, one layer at a
        time: the caller casts the weight into its own storage, so the only
        temporary is one layer's float64 draw (``INIT_BYTES_PER_WEIGHT`` per weight).
    """
    rng = np.random.default_rng(seed)
    for n_in, n_out, activation, slope in specs:
        gain = REGISTRY[activation].gain2
        if gain is not None:
            gain2 = gain(slope)
            W = rng.standard_normal((n_in, n_out))
            W *= np.sqrt(gain2 / n_in)  # in place: no second temporary
        else:
            limit = np.sqrt(6.0 / (n_in + n_out))
            W = rng.uniform(-limit, limit, size=(n_in, n_out))
        yield W, np.zeros(n_out, dtype=dtype)


#: Bytes per weight that drawing a layer's initial weights takes besides its storage.
INIT_BYTES_PER_WEIGHT = 8
