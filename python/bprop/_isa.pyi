"""Type stubs of ``bprop._isa`` (cpp/bindings/isa.cpp): the builds of the core this
install holds and the ISA levels this CPU runs."""

from typing import List, Tuple

#: the levels bprop knows on this architecture: ("baseline", "v3", "v4") on x86-64
LEVELS: Tuple[str, ...]
#: "portable" or "native" (BPROP_NATIVE=ON)
BUILD: str
#: the levels of the cores a portable build holds; empty for a native build
BUILT_LEVELS: Tuple[str, ...]

def cpu_lacks(level: str) -> List[str]:
    """The features of an ISA level this CPU lacks; empty if it runs it."""
