#include "network_impl.hpp"

namespace bprop {
template class Network<float>;
}  // namespace bprop
