#include "network_impl.hpp"

namespace bprop {
template struct Dense<float>;
template class Network<float>;
}  // namespace bprop
