// Stand-in for detectron2's compiled extension `detectron2._C`.
//
// The detectron2 v0.6 source distribution that d2prune installs by default ships without
// `detectron2/layers/csrc`, yet its Python modules import `detectron2._C` at import time.
// This module satisfies that import and nothing more: the deformable/rotated ops and the
// C++ COCO evaluator stay absent, and d2prune checks for them before use
// (see d2prune/compat.py).
#include <torch/extension.h>

namespace {
std::string compiler_version() {
#if defined(__GNUC__) && !defined(__clang__)
  return "GCC " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__);
#else
  return "unknown";
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "d2prune stub: detectron2 C++/CUDA ops are not compiled in this build";
  m.attr("D2PRUNE_STUB") = true;
  m.def("get_compiler_version", &compiler_version);
  m.def("get_cuda_version", []() { return std::string("not built"); });
  m.def("has_cuda", []() { return false; });
}
