#include "layers_impl.hpp"

namespace bprop {
template class Dense<double>;
template class ActivationLayer<double>;
template class Dropout<double>;
template class BatchNorm<double>;
template class LayerNorm<double>;
template class Residual<double>;
template std::unique_ptr<Layer<double>> make_layer<double>(const LayerSpec&, Index, const std::string&);
}  // namespace bprop
