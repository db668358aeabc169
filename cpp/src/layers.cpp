// What the layers share across scalar types: names, widths, the dropout generator.
#include "bprop/layers.hpp"

namespace bprop {

LayerSpec LayerSpec::dense_layer(Index in, Index out, Activation act, double negative_slope,
                                 bool bias) {
  LayerSpec s;
  s.kind = Kind::dense;
  s.in_features = in;
  s.out_features = out;
  s.activation = act;
  s.negative_slope = negative_slope;
  s.bias = bias;
  return s;
}

const char* kind_name(LayerSpec::Kind kind) {
  switch (kind) {
    case LayerSpec::Kind::dense: return "Dense";
    case LayerSpec::Kind::activation: return "Activation";
    case LayerSpec::Kind::dropout: return "Dropout";
    case LayerSpec::Kind::batch_norm: return "BatchNorm";
    case LayerSpec::Kind::layer_norm: return "LayerNorm";
    case LayerSpec::Kind::residual: return "Residual";
  }
  return "unknown";
}

Index declared_in_features(const LayerSpec& spec) {
  switch (spec.kind) {
    case LayerSpec::Kind::dense:
    case LayerSpec::Kind::batch_norm:
    case LayerSpec::Kind::layer_norm:
      return spec.in_features;
    case LayerSpec::Kind::activation:
    case LayerSpec::Kind::dropout:
      return -1;
    case LayerSpec::Kind::residual:
      for (const LayerSpec& inner : spec.layers) {
        const Index n = declared_in_features(inner);
        if (n >= 0) return n;
      }
      return -1;
  }
  return -1;
}

std::uint64_t dropout_key(std::uint64_t seed, std::int64_t step, std::int64_t index) {
  return splitmix64(splitmix64(splitmix64(seed) ^ static_cast<std::uint64_t>(step)) ^
                    static_cast<std::uint64_t>(index));
}

}  // namespace bprop
