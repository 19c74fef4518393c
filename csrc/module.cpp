// The Python module fdm_fast._C. Importing it loads this library, which registers the ops
// (bindings.cpp, namespace fdm_fast_ext); the module itself only says which kernels were built.
#include <Python.h>

extern "C" int fdm_fast_has_cpu();
extern "C" int fdm_fast_has_cuda();
extern "C" void fdm_fast_set_poison(int on);
extern "C" const char* fdm_fast_cpu_isa();

static PyObject* has_cpu(PyObject*, PyObject*) { return PyBool_FromLong(fdm_fast_has_cpu()); }
static PyObject* has_cuda(PyObject*, PyObject*) { return PyBool_FromLong(fdm_fast_has_cuda()); }

static PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(fdm_fast_cpu_isa()); }

static PyObject* set_poison(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  fdm_fast_set_poison(on);
  Py_RETURN_NONE;
}

static PyMethodDef kMethods[] = {
    {"has_cpu", has_cpu, METH_NOARGS, "True: the CPU kernels are built."},
    {"has_cuda", has_cuda, METH_NOARGS, "True: the CUDA kernels are built."},
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The CPU kernels' build in use: 'avx512', 'avx2' or 'base' (capped by FDM_FAST_CPU_ISA)."},
    {"set_poison", set_poison, METH_O, "Testing: fill every output with NaN before its kernel runs."},
    {nullptr, nullptr, 0, nullptr},
};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "fdm_fast compiled fused ops (torch.ops.fdm_fast_ext)",
                              -1, kMethods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
