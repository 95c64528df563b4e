"""``distk.outer``: sparse outer synchronisation of a plain model (DiLoCo / SparseLoCo
style). The implementation lives in :mod:`distk.integrations.outer`, beside the other
step owners; this module keeps ``distk.outer.enable`` and its names where users find
them."""

from distk.integrations.outer import (
    STATE_VERSION,
    OuterSync,
    ParameterMismatchError,
    check_same_parameters,
    enable,
    sparseloco,
)

__all__ = ["STATE_VERSION", "OuterSync", "ParameterMismatchError", "check_same_parameters",
           "enable", "sparseloco"]
