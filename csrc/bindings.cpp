// torch.library registration of the compiled fused ops (namespace fdm_fast_ext), and the one place
// that validates their arguments. The same function serves the CPU and CUDA dispatch keys: it checks
// every argument (messages name it; TORCH_CHECK_VALUE / _TYPE raise Python ValueError / TypeError),
// allocates outputs in the input's layout, and fills raw-pointer argument structs for the CPU kernels
// or the CUDA launchers. Kernels never see a torch type. The fake kernels (shapes only, for
// torch.compile and meta tensors) are registered in Python (fdm_fast/ops/extension.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <string>
#include <vector>

#include "fdm_ops.h"

#ifdef FDM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cuda/fdm_cuda.h"
#endif

// Test builds only (tests/cuda_on_cpu): CPU tensors go to the CUDA launchers, whose kernels that build
// runs on the host through an emulated launch, so the CPU test suite exercises the CUDA code.
#ifdef FDM_CUDA_ON_CPU
#ifdef FDM_WITH_CUDA
#error "FDM_CUDA_ON_CPU is a CPU-only test build"
#endif
#include "../cuda/fdm_cuda.h"
#endif

namespace {

using at::Tensor;
using c10::optional;

fdm::DType dtype_from(at::ScalarType st, const char* name) {
  switch (st) {
    case at::kFloat: return fdm::DType::F32;
    case at::kBFloat16: return fdm::DType::BF16;
    case at::kHalf: return fdm::DType::F16;
    default: TORCH_CHECK_TYPE(false, name, ": expected float32, bfloat16 or float16, got ", st);
  }
  return fdm::DType::F32;
}

fdm::Spec spec_from(int64_t kind, bool fdm_variant, at::ArrayRef<double> params) {
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 2, "kind: expected 0 (vp), 1 (ve) or 2 (edm), got ", kind);
  TORCH_CHECK_VALUE(params.size() == 8, "params: expected the 8 floats of Precond.kernel_spec(), got ",
                    params.size());
  return fdm::Spec{static_cast<int>(kind), fdm_variant ? 1 : 0, static_cast<float>(params[0]),
                   static_cast<float>(params[3]), static_cast<float>(params[4]), static_cast<float>(params[5]),
                   static_cast<float>(params[6]), static_cast<float>(params[7])};
}

// Data pointer, or nullptr for a Meta tensor (shape-only runs under torch.compile's fake tensors).
template <class T>
T* ptr(const Tensor& t) {
  return t.device().is_meta() ? nullptr : t.data_ptr<T>();
}

bool is_channels_last(const Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat layout_of(const Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

void check_device(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device().is_cuda() || t.device().is_meta(), name,
                    ": expected a CPU or CUDA tensor, got device ", t.device());
#ifndef FDM_WITH_CUDA
  TORCH_CHECK_VALUE(!t.device().is_cuda(), name, ": fdm_fast._C was built without CUDA kernels, got a CUDA tensor");
#endif
}

// The main tensor of an op: a batch, contiguous or channels_last; its geometry.
fdm::Geometry geometry_of(const Tensor& t, const char* name) {
  check_device(t, name);
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) >= 1, name, ": expected a batch of at least one sample, got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous() || is_channels_last(t), name,
                    ": expected a contiguous or channels_last tensor, got strides ", t.strides());
  const int64_t B = t.size(0), P = t.numel() / B;
  TORCH_CHECK_VALUE(P < (int64_t(1) << 31), name, ": expected fewer than 2^31 elements per sample, got ", P);
  const bool cl = is_channels_last(t);
  const int64_t C = t.dim() == 4 ? t.size(1) : 1, HW = t.dim() == 4 ? t.size(2) * t.size(3) : P;
  return fdm::Geometry{B, P, HW, C, cl};
}

// Another data tensor of the op: same shape, device and memory layout as the main one. Layouts are
// compared as memory orders, not strides: strides of size-1 dims never count, so a [B, 1, H, W]
// tensor with channels_last strides matches a contiguous one (the same bytes in the same order).
void check_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (the shape of ", ref_name,
                    "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected device ", ref.device(), " (the device of ",
                    ref_name, "), got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(layout_of(ref)), name, ": expected the memory layout of ", ref_name,
                    " (strides ", ref.strides(), "), got strides ", t.strides());
}

void check_float32(const Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, ": expected float32 (sampler state), got ", t.scalar_type());
}

// A per-sample float32 vector [B] on the op's device.
const float* per_sample(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, ": expected a float32 tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == ref.size(0) && t.is_contiguous(), name,
                    ": expected a contiguous [", ref.size(0), "] tensor (one value per sample), got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected device ", ref.device(), ", got ", t.device());
  return ptr<float>(t);
}

// The noise source; `keep` holds an explicit noise tensor converted to float32 in ref's layout.
fdm::Noise noise_from(const Tensor& rng, const optional<Tensor>& noise, const Tensor& ref, Tensor& keep) {
  TORCH_CHECK_TYPE(rng.scalar_type() == at::kLong, "rng: expected int64 (seed, offset) rows, got ", rng.scalar_type());
  TORCH_CHECK_VALUE(rng.dim() == 2 && rng.size(1) == 2 && (rng.size(0) == 1 || rng.size(0) == ref.size(0)) &&
                        rng.is_contiguous(),
                    "rng: expected a contiguous [1, 2] or [", ref.size(0), ", 2] tensor of (seed, offset), got shape ",
                    rng.sizes());
  TORCH_CHECK_VALUE(rng.device() == ref.device(), "rng: expected device ", ref.device(), ", got ", rng.device());
  fdm::Noise nz{ptr<int64_t>(rng), rng.size(0) > 1, nullptr};
  if (noise.has_value()) {
    TORCH_CHECK_VALUE(noise->sizes() == ref.sizes(), "noise: expected shape ", ref.sizes(), ", got ", noise->sizes());
    TORCH_CHECK_VALUE(noise->device() == ref.device(), "noise: expected device ", ref.device(), ", got ",
                      noise->device());
    dtype_from(noise->scalar_type(), "noise");
    keep = noise->to(at::kFloat).contiguous(layout_of(ref));
    nz.explicit_noise = ptr<float>(keep);
  }
  return nz;
}

// Tests set this (fdm_fast._C.set_poison) to fill every output with NaN before a kernel runs, so an
// element a kernel leaves unwritten fails the comparison.
bool g_poison = false;

Tensor poisoned(Tensor t) {
  if (g_poison && !t.device().is_meta()) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

Tensor empty_like_layout(const Tensor& ref, at::ScalarType dt) {
  return poisoned(at::empty(ref.sizes(), ref.options().dtype(dt).memory_format(layout_of(ref))));
}

// Makes the tensor's device current for the whole op (allocation, device queries, launch); a no-op
// for CPU and Meta tensors and in a CPU-only build.
struct DeviceGuard {
#ifdef FDM_WITH_CUDA
  c10::OptionalDeviceGuard guard;
  explicit DeviceGuard(const Tensor& t) {
    if (t.device().is_cuda()) guard.reset_device(t.device());
  }
#else
  explicit DeviceGuard(const Tensor&) {}
#endif
};

// The CUDA entry point of an op, or nullptr in a CPU-only build.
#if defined(FDM_WITH_CUDA) || defined(FDM_CUDA_ON_CPU)
#define FDM_CUDA_FN(name) (&fdm::cuda::name)
#else
#define FDM_CUDA_FN(name) nullptr
#endif

// Runs the op's CPU kernel or CUDA launcher on `args` for a real tensor; nothing for Meta.
template <class T>
struct NonDeduced {  // keeps a nullptr CUDA entry point (CPU-only build) out of template deduction
  using type = T;
};

template <class Args>
void run(const Tensor& ref, const Args& args, void (*cpu_fn)(const Args&),
         typename NonDeduced<void (*)(const Args&, void*)>::type cuda_fn) {
  if (ref.device().is_meta() || ref.numel() == 0) return;
  if (ref.device().is_cpu()) {
#ifdef FDM_CUDA_ON_CPU
    (void)cpu_fn;
    cuda_fn(args, nullptr);
#else
    cpu_fn(args);
#endif
    return;
  }
#ifdef FDM_WITH_CUDA
  const c10::cuda::CUDAGuard guard(ref.device());  // the op's DeviceGuard already set it; cheap
  cuda_fn(args, static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()));
#else
  (void)cuda_fn;
#endif
}

// ------------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> perturb(const Tensor& y, const Tensor& sigma, const Tensor& rng,
                                   const optional<Tensor>& noise, int64_t kind, bool fdm_variant,
                                   at::ArrayRef<double> params, at::ScalarType out_dtype, bool write_x) {
  const DeviceGuard device_guard(y);
  const fdm::Geometry g = geometry_of(y, "y");
  fdm::PerturbArgs a{g, spec_from(kind, fdm_variant, params)};
  a.y_t = dtype_from(y.scalar_type(), "y");
  a.net_t = dtype_from(out_dtype, "out_dtype");
  Tensor net_in = empty_like_layout(y, out_dtype);
  Tensor x = write_x ? empty_like_layout(y, at::kFloat) : at::empty({0}, y.options().dtype(at::kFloat));
  Tensor keep;
  a.sigma = per_sample(sigma, "sigma", y);
  a.noise = noise_from(rng, noise, y, keep);
  if (y.device().is_meta()) return {net_in, x};
  a.y = y.data_ptr();
  a.net_in = net_in.data_ptr();
  a.x = write_x ? x.data_ptr<float>() : nullptr;
  run(y, a, &fdm::cpu::perturb, FDM_CUDA_FN(perturb));
  return {net_in, x};
}

Tensor randn(at::IntArrayRef shape, const Tensor& rng) {
  const DeviceGuard device_guard(rng);
  TORCH_CHECK_VALUE(!shape.empty() && shape[0] >= 1, "shape: expected a non-empty shape with a batch, got ", shape);
  for (auto s : shape) TORCH_CHECK_VALUE(s >= 1, "shape: expected positive sizes, got ", shape);
  Tensor out = poisoned(at::empty(shape, rng.options().dtype(at::kFloat)));
  const bool per = rng.dim() == 2 && rng.size(0) > 1;
  const int64_t B = per ? shape[0] : 1, P = out.numel() / B;
  fdm::RandnArgs a{fdm::Geometry{B, P, P, 1, false}};
  Tensor ref = out.view({B, P}), keep;
  a.noise = noise_from(rng, c10::nullopt, ref, keep);
  if (out.device().is_meta()) return out;
  a.out = out.data_ptr<float>();
  run(out, a, &fdm::cpu::randn, FDM_CUDA_FN(randn));
  return out;
}

fdm::LossArgs loss_args(const Tensor& F, const Tensor& y, const Tensor& sigma, const Tensor& rng,
                        const optional<Tensor>& noise, const Tensor& clamp, int64_t kind, bool fdm_variant,
                        at::ArrayRef<double> params, Tensor& keep) {
  fdm::LossArgs a{geometry_of(F, "F"), spec_from(kind, fdm_variant, params)};
  check_like(y, "y", F, "F");
  a.F_t = dtype_from(F.scalar_type(), "F");
  a.y_t = dtype_from(y.scalar_type(), "y");
  a.sigma = per_sample(sigma, "sigma", F);
  a.noise = noise_from(rng, noise, F, keep);
  TORCH_CHECK_TYPE(clamp.scalar_type() == at::kFloat, "clamp: expected float32, got ", clamp.scalar_type());
  TORCH_CHECK_VALUE(clamp.numel() == 1 && clamp.device() == F.device(), "clamp: expected one value on ", F.device(),
                    ", got shape ", clamp.sizes(), " on ", clamp.device());
  a.clamp = ptr<float>(clamp);
  if (!F.device().is_meta()) {
    a.F = F.data_ptr();
    a.y = y.data_ptr();
  }
  return a;
}

// Per-sample loss; with save_grad also the unscaled gradient G = 2 w c_out (D - y) (F's dtype and
// layout), so that the backward is scale_grad(G, grad): one noise pass per step instead of two.
std::tuple<Tensor, Tensor> loss_fwd(const Tensor& F, const Tensor& y, const Tensor& sigma, const Tensor& rng,
                                    const optional<Tensor>& noise, const Tensor& clamp, int64_t kind,
                                    bool fdm_variant, at::ArrayRef<double> params, bool save_grad) {
  const DeviceGuard device_guard(F);
  Tensor keep;
  fdm::LossArgs a = loss_args(F, y, sigma, rng, noise, clamp, kind, fdm_variant, params, keep);
  Tensor G = save_grad ? empty_like_layout(F, F.scalar_type()) : at::empty({0}, F.options());
  if (F.device().is_meta()) return {at::empty({F.size(0)}, F.options().dtype(at::kFloat)), G};
  a.G = save_grad ? G.data_ptr() : nullptr;
#ifdef FDM_WITH_CUDA
  a.parts = F.device().is_cuda() ? fdm::cuda::loss_parts(a.g) : fdm::cpu::loss_parts(a.g);
#elif defined(FDM_CUDA_ON_CPU)
  a.parts = fdm::cuda::loss_parts(a.g);
#else
  a.parts = fdm::cpu::loss_parts(a.g);
#endif
  Tensor partial = poisoned(at::empty({a.g.B, a.parts}, F.options().dtype(at::kFloat)));
  a.partial = partial.data_ptr<float>();
  run(F, a, &fdm::cpu::loss_fwd, FDM_CUDA_FN(loss_fwd));
  return {partial.sum(1), G};
}

Tensor scale_grad(const Tensor& G, const Tensor& grad) {
  const DeviceGuard device_guard(G);
  fdm::LossArgs a{geometry_of(G, "G")};
  a.F_t = dtype_from(G.scalar_type(), "G");
  Tensor dF = empty_like_layout(G, G.scalar_type());
  if (G.device().is_meta()) return dF;
  Tensor g = grad.to(at::kFloat).contiguous();
  a.grad = per_sample(g, "grad", G);
  a.F = G.data_ptr();
  a.dF = dF.data_ptr();
  run(G, a, &fdm::cpu::scale_grad, FDM_CUDA_FN(scale_grad));
  return dF;
}

Tensor loss_bwd(const Tensor& grad, const Tensor& F, const Tensor& y, const Tensor& sigma, const Tensor& rng,
                const optional<Tensor>& noise, const Tensor& clamp, int64_t kind, bool fdm_variant,
                at::ArrayRef<double> params) {
  const DeviceGuard device_guard(F);
  Tensor keep;
  fdm::LossArgs a = loss_args(F, y, sigma, rng, noise, clamp, kind, fdm_variant, params, keep);
  Tensor dF = empty_like_layout(F, F.scalar_type());
  if (F.device().is_meta()) return dF;
  Tensor g = grad.to(at::kFloat).contiguous();
  a.grad = per_sample(g, "grad", F);
  a.dF = dF.data_ptr();
  run(F, a, &fdm::cpu::loss_bwd, FDM_CUDA_FN(loss_bwd));
  return dF;
}

std::tuple<Tensor, Tensor> churn(const Tensor& x, const Tensor& t_cur, const Tensor& t_hat, const Tensor& rng,
                                 const optional<Tensor>& noise, double S_noise, int64_t kind, bool fdm_variant,
                                 at::ArrayRef<double> params, at::ScalarType net_dtype) {
  const DeviceGuard device_guard(x);
  fdm::ChurnArgs a{geometry_of(x, "x"), spec_from(kind, fdm_variant, params)};
  check_float32(x, "x");
  a.net_t = dtype_from(net_dtype, "net_dtype");
  a.t_cur = per_sample(t_cur, "t_cur", x);
  a.t_hat = per_sample(t_hat, "t_hat", x);
  Tensor keep;
  a.noise = noise_from(rng, noise, x, keep);
  a.S_noise = static_cast<float>(S_noise);
  Tensor x_out = empty_like_layout(x, at::kFloat), net_in = empty_like_layout(x, net_dtype);
  if (x.device().is_meta()) return {x_out, net_in};
  a.x = x.data_ptr<float>();
  a.x_out = x_out.data_ptr<float>();
  a.net_in = net_in.data_ptr();
  run(x, a, &fdm::cpu::churn, FDM_CUDA_FN(churn));
  return {x_out, net_in};
}

// write_x / write_d false: that output is not written (an empty tensor comes back in its place).
std::tuple<Tensor, Tensor, Tensor> euler_step(const Tensor& x, const Tensor& F, const Tensor& t_cur,
                                              const Tensor& t_next, int64_t kind, bool fdm_variant,
                                              at::ArrayRef<double> params, at::ScalarType net_dtype, bool write_x,
                                              bool write_d) {
  const DeviceGuard device_guard(x);
  fdm::EulerArgs a{geometry_of(x, "x"), spec_from(kind, fdm_variant, params)};
  check_float32(x, "x");
  check_like(F, "F", x, "x");
  a.F_t = dtype_from(F.scalar_type(), "F");
  a.net_t = dtype_from(net_dtype, "net_dtype");
  a.t_cur = per_sample(t_cur, "t_cur", x);
  a.t_next = per_sample(t_next, "t_next", x);
  const auto none = [&] { return at::empty({0}, x.options().dtype(at::kFloat)); };  // distinct: outputs never alias
  Tensor x_out = write_x ? empty_like_layout(x, at::kFloat) : none();
  Tensor d = write_d ? empty_like_layout(x, at::kFloat) : none();
  Tensor net_in = empty_like_layout(x, net_dtype);
  if (x.device().is_meta()) return {x_out, d, net_in};
  a.x = x.data_ptr<float>();
  a.F = F.data_ptr();
  a.x_out = write_x ? x_out.data_ptr<float>() : nullptr;
  a.d_out = write_d ? d.data_ptr<float>() : nullptr;
  a.net_in = net_in.data_ptr();
  run(x, a, &fdm::cpu::euler_step, FDM_CUDA_FN(euler_step));
  return {x_out, d, net_in};
}

std::tuple<Tensor, Tensor> heun_step(const Tensor& x, const Tensor& d, const Tensor& F, const Tensor& t_cur,
                                     const Tensor& t_next, const optional<Tensor>& t_hat_next, const Tensor& rng,
                                     const optional<Tensor>& noise, double S_noise, int64_t kind, bool fdm_variant,
                                     at::ArrayRef<double> params, at::ScalarType net_dtype) {
  const DeviceGuard device_guard(x);
  fdm::HeunArgs a{geometry_of(x, "x"), spec_from(kind, fdm_variant, params)};
  check_float32(x, "x");
  check_float32(d, "d");
  check_like(d, "d", x, "x");
  check_like(F, "F", x, "x");
  a.F_t = dtype_from(F.scalar_type(), "F");
  a.net_t = dtype_from(net_dtype, "net_dtype");
  a.t_cur = per_sample(t_cur, "t_cur", x);
  a.t_next = per_sample(t_next, "t_next", x);
  a.t_hat_next = t_hat_next.has_value() ? per_sample(*t_hat_next, "t_hat_next", x) : nullptr;
  Tensor keep;
  a.noise = noise_from(rng, noise, x, keep);
  a.S_noise = static_cast<float>(S_noise);
  Tensor x_out = empty_like_layout(x, at::kFloat), net_in = empty_like_layout(x, net_dtype);
  if (x.device().is_meta()) return {x_out, net_in};
  a.x = x.data_ptr<float>();
  a.d = d.data_ptr<float>();
  a.F = F.data_ptr();
  a.x_out = x_out.data_ptr<float>();
  a.net_in = net_in.data_ptr();
  run(x, a, &fdm::cpu::heun_step, FDM_CUDA_FN(heun_step));
  return {x_out, net_in};
}

// The solvers' step; see fdm_fast/ops/__init__.py multistep and MultistepArgs for the coefficient columns.
std::tuple<Tensor, Tensor, Tensor> multistep(const Tensor& x, const optional<Tensor>& F, const optional<Tensor>& G,
                                             at::TensorList history, const Tensor& coef, const Tensor& rng,
                                             const optional<Tensor>& noise, bool draws, at::ScalarType net_dtype,
                                             bool write_net, bool write_keep) {
  const DeviceGuard device_guard(x);
  fdm::MultistepArgs a{geometry_of(x, "x")};
  check_float32(x, "x");
  if (F.has_value()) {
    check_like(*F, "F", x, "x");
    a.F_t = dtype_from(F->scalar_type(), "F");
  }
  if (G.has_value()) {
    TORCH_CHECK_VALUE(F.has_value(), "G: a guiding network output needs F (the main one)");
    check_like(*G, "G", x, "x");
    a.G_t = dtype_from(G->scalar_type(), "G");
  }
  const int64_t K = static_cast<int64_t>(history.size());
  TORCH_CHECK_VALUE(K <= fdm::kMaxHistory, "history: expected at most ", fdm::kMaxHistory, " stored tensors, got ", K);
  static const char* hname[fdm::kMaxHistory] = {"history[0]", "history[1]", "history[2]", "history[3]"};
  for (int64_t k = 0; k < K; ++k) {
    check_float32(history[k], hname[k]);
    check_like(history[k], hname[k], x, "x");
  }
  TORCH_CHECK_TYPE(coef.scalar_type() == at::kFloat, "coef: expected float32, got ", coef.scalar_type());
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(1) == 9 + K && (coef.size(0) == 1 || coef.size(0) == x.size(0)) &&
                        coef.is_contiguous(),
                    "coef: expected a contiguous [1, ", 9 + K, "] or [", x.size(0), ", ", 9 + K,
                    "] tensor (the coefficient columns), got shape ", coef.sizes());
  TORCH_CHECK_VALUE(coef.device() == x.device(), "coef: expected device ", x.device(), ", got ", coef.device());
  a.net_t = dtype_from(net_dtype, "net_dtype");
  Tensor keep_noise;
  a.noise = noise_from(rng, noise, x, keep_noise);
  a.draws = draws;
  a.K = static_cast<int>(K);
  a.coef_stride = coef.size(0) > 1 ? coef.size(1) : 0;
  const auto none = [&] { return at::empty({0}, x.options().dtype(at::kFloat)); };  // distinct: outputs never alias
  Tensor x_out = empty_like_layout(x, at::kFloat);
  Tensor net_in = write_net ? empty_like_layout(x, net_dtype) : none();
  Tensor kept = write_keep ? empty_like_layout(x, at::kFloat) : none();
  if (x.device().is_meta()) return {x_out, net_in, kept};
  a.x = x.data_ptr<float>();
  a.F = F.has_value() ? F->data_ptr() : nullptr;
  a.G = G.has_value() ? G->data_ptr() : nullptr;
  for (int k = 0; k < fdm::kMaxHistory; ++k) a.H[k] = k < K ? history[k].data_ptr<float>() : nullptr;
  a.coef = coef.data_ptr<float>();
  a.x_out = x_out.data_ptr<float>();
  a.net_in = write_net ? net_in.data_ptr() : nullptr;
  a.keep = write_keep ? kept.data_ptr<float>() : nullptr;
  run(x, a, &fdm::cpu::multistep, FDM_CUDA_FN(multistep));
  return {x_out, net_in, kept};
}

}  // namespace

TORCH_LIBRARY(fdm_fast_ext, m) {
  m.def("perturb(Tensor y, Tensor sigma, Tensor rng, Tensor? noise, int kind, bool fdm, float[] params, "
        "ScalarType out_dtype, bool write_x) -> (Tensor, Tensor)");
  m.def("randn(int[] shape, Tensor rng) -> Tensor");
  m.def("loss_fwd(Tensor F, Tensor y, Tensor sigma, Tensor rng, Tensor? noise, Tensor clamp, int kind, bool fdm, "
        "float[] params, bool save_grad) -> (Tensor, Tensor)");
  m.def("scale_grad(Tensor G, Tensor grad) -> Tensor");
  m.def("loss_bwd(Tensor grad, Tensor F, Tensor y, Tensor sigma, Tensor rng, Tensor? noise, Tensor clamp, "
        "int kind, bool fdm, float[] params) -> Tensor");
  m.def("churn(Tensor x, Tensor t_cur, Tensor t_hat, Tensor rng, Tensor? noise, float S_noise, int kind, bool fdm, "
        "float[] params, ScalarType net_dtype) -> (Tensor, Tensor)");
  m.def("euler_step(Tensor x, Tensor F, Tensor t_cur, Tensor t_next, int kind, bool fdm, float[] params, "
        "ScalarType net_dtype, bool write_x, bool write_d) -> (Tensor, Tensor, Tensor)");
  m.def("heun_step(Tensor x, Tensor d, Tensor F, Tensor t_cur, Tensor t_next, Tensor? t_hat_next, Tensor rng, "
        "Tensor? noise, float S_noise, int kind, bool fdm, float[] params, ScalarType net_dtype) -> (Tensor, Tensor)");
  m.def("multistep(Tensor x, Tensor? F, Tensor? G, Tensor[] history, Tensor coef, Tensor rng, Tensor? noise, "
        "bool draws, ScalarType net_dtype, bool write_net, bool write_keep) -> (Tensor, Tensor, Tensor)");
}

#define FDM_REGISTER(KEY)                        \
  TORCH_LIBRARY_IMPL(fdm_fast_ext, KEY, m) {     \
    m.impl("perturb", &perturb);                 \
    m.impl("randn", &randn);                     \
    m.impl("loss_fwd", &loss_fwd);               \
    m.impl("loss_bwd", &loss_bwd);               \
    m.impl("scale_grad", &scale_grad);           \
    m.impl("churn", &churn);                     \
    m.impl("euler_step", &euler_step);           \
    m.impl("heun_step", &heun_step);             \
    m.impl("multistep", &multistep);             \
  }

FDM_REGISTER(CPU)
// No Meta registration here: the fake (shape-only) kernels are Python functions in
// fdm_fast/ops/extension.py, written over symbolic sizes so torch.compile's dynamic shapes trace.
#ifdef FDM_WITH_CUDA
FDM_REGISTER(CUDA)
#endif

// Queried by fdm_fast.ops to list the backends this build has.
extern "C" {
int fdm_fast_has_cpu() { return 1; }
void fdm_fast_set_poison(int on) { g_poison = on != 0; }
int fdm_fast_has_cuda() {
#ifdef FDM_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}
}
