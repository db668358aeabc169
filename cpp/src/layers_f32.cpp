#include "layers_impl.hpp"

namespace bprop {
template class Dense<float>;
template class ActivationLayer<float>;
template class Dropout<float>;
template class BatchNorm<float>;
template class LayerNorm<float>;
template class Residual<float>;
template std::unique_ptr<Layer<float>> make_layer<float>(const LayerSpec&, Index, const std::string&);
}  // namespace bprop
