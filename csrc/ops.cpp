// Schemas of the kernel ops, declared once. Each backend file registers its kernels with
// TORCH_LIBRARY_IMPL(drep, CPU|CUDA, m); a CPU-only build leaves csrc/cuda/ out.
// The public ops (drep::denoise_loss, drep::merge_weights, drep::linear_denoise: autograd,
// fake kernels, backend choice) are defined in Python, drep_kernels/ops/, and call these.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include "cpu/isa.h"
#include "cpu/workspace.h"

#ifdef DREP_WITH_CUDA
#include "build_info.h"
#endif

namespace {

// _C.build_info(): what this binary was compiled against, from the compiler's own macros, so
// that `python -m drep_kernels.env` can tell a stale or mismatched build without a GPU:
// {"torch": "2.14.1", "cuda": "13.0" or None, "cuda_archs": "800,900" or None}.
PyObject* build_info(PyObject*, PyObject*) {
#ifdef DREP_WITH_CUDA
  const int rt = drep::cuda_runtime_version();
  PyObject* cuda = PyUnicode_FromFormat("%d.%d", rt / 1000, (rt % 1000) / 10);
  PyObject* archs = PyUnicode_FromString(drep::cuda_arch_list());
#else
  PyObject* cuda = Py_NewRef(Py_None);
  PyObject* archs = Py_NewRef(Py_None);
#endif
  if (cuda == nullptr || archs == nullptr) {
    Py_XDECREF(cuda);
    Py_XDECREF(archs);
    return nullptr;
  }
  // "N" steals the references made above.
  return Py_BuildValue("{s:s,s:N,s:N}", "torch", TORCH_VERSION, "cuda", cuda, "cuda_archs", archs);
}

// _C.cpu_vector_path(): the vector path the CPU kernels take in this process, "avx512", "avx2"
// or "baseline" (csrc/cpu/isa.h): the CPU's, narrowed by DREP_CPU_NO_AVX512 / DREP_CPU_NO_AVX2.
PyObject* cpu_vector_path(PyObject*, PyObject*) {
  return PyUnicode_FromString(drep::cpu_path_name(drep::cpu_path()));
}

// _C.cpu_workspace(release): the bytes of scratch the CPU loss kernel keeps for the calling
// thread (csrc/cpu/workspace.h); with a true `release`, frees them after reading.
PyObject* cpu_workspace(PyObject*, PyObject* release) {
  const int free_it = PyObject_IsTrue(release);
  if (free_it < 0) return nullptr;
  PyObject* held = PyLong_FromSize_t(drep::cpu_workspace_bytes());
  if (held != nullptr && free_it) drep::release_cpu_workspace();
  return held;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What this extension was compiled against (torch, CUDA, archs)."},
    {"cpu_vector_path", cpu_vector_path, METH_NOARGS, "The vector path of the CPU kernels here (avx512, avx2, baseline)."},
    {"cpu_workspace", cpu_workspace, METH_O, "Scratch bytes the CPU loss kernel keeps for this thread; frees them if the argument is true."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// Importing drep_kernels._C runs the static registrars below (the kernels); the module itself
// holds only build_info(), cpu_vector_path() and cpu_workspace().
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(drep, m) {
  // docs/method.md M1, M2: (W', b') with b' empty when neither bias exists.
  m.def(
      "merge_weights_fwd(Tensor weight, Tensor? bias, Tensor denoise_weight, Tensor? denoise_bias, "
      "float c1, float c3) -> (Tensor, Tensor)");
  // docs/method.md M3..M5: (dW, dW_d, db_d) in the compute dtype, each empty unless asked for.
  m.def(
      "merge_weights_bwd(Tensor grad_merged_weight, Tensor? grad_merged_bias, Tensor weight, "
      "Tensor denoise_weight, Tensor? denoise_bias, float c1, float c3, bool need_weight, "
      "bool need_denoise) -> (Tensor, Tensor, Tensor)");
  // docs/method.md L1, L2: (loss, dL/dW_d, dL/db_d) for a 2-D x; eps from `noise` if given,
  // else from the counter-based stream of `seed` (csrc/philox.h).
  m.def(
      "denoise_loss_fwd(Tensor x, Tensor denoise_weight, Tensor? denoise_bias, float a, float s, "
      "Tensor? noise, Tensor seed, bool compute_grad) -> (Tensor, Tensor, Tensor)");
  // Test hook: rows row0 .. row0 + rows - 1 of the noise matrix (cols columns) of `seed` as
  // the backend of `like`'s device draws it inside denoise_loss_fwd (N1), float32. The CUDA
  // kernel answers with its loss epilogue's path (its thread layout) when per_element is set.
  m.def("_denoise_noise(Tensor like, Tensor seed, int row0, int rows, int cols, bool per_element) -> Tensor");
}
