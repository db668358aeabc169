#include "network_impl.hpp"

namespace bprop {
template struct Dense<double>;
template class Network<double>;
}  // namespace bprop
