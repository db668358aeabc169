#include "network_impl.hpp"

namespace bprop {
template class Network<double>;
}  // namespace bprop
