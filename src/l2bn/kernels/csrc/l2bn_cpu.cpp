// The l2bn operators for the CPU. One translation unit: kernels.h holds the computation,
// layer.h the single-call layer and its C++ autograd; this file registers them.
//
//   l2bn::train_forward, l2bn::eval_forward, l2bn::backward  the kernel passes, called by the
//       Python layer (kernels/native.py: fake kernels for torch.compile, autograd in Python);
//   l2bn::layer  one call per module forward on the CPU (layer.h), with its C++ autograd.

#include "kernels.h"
#include "layer.h"

TORCH_LIBRARY(l2bn, m) {
  m.def("train_forward(Tensor x, Tensor? weight, Tensor? bias, float eps, float l2_eps, float s) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("eval_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, float eps, float l2_eps, "
        "float s) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("backward(Tensor g, Tensor x, Tensor? weight, Tensor k, Tensor r, Tensor? mk, Tensor? vk, Tensor mu, "
        "Tensor invstd, float l2_eps, float s, bool batch_stats, bool need_dx) -> (Tensor, Tensor, Tensor)");
  m.def("layer(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor(c!)? num_batches_tracked, bool training, bool track_running_stats, float? momentum, bool warmup, "
        "float eps, float l2_eps, bool unit_rms, int[] dims, int num_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(l2bn, CPU, m) {
  m.impl("train_forward", &train_forward);
  m.impl("eval_forward", &eval_forward);
  m.impl("backward", &backward);
}

// Above autograd and for every device: the layer makes its own autograd node, and declines
// (returns None) for anything but a dense CPU input.
TORCH_LIBRARY_IMPL(l2bn, CompositeImplicitAutograd, m) {
  m.impl("layer", &layer);
}
