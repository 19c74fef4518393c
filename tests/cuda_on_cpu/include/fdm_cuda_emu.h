// Host stand-ins for the CUDA pieces csrc/cuda/ops_cuda.cu uses, so that file's kernels can run on a
// CPU in tests (tests/cuda_on_cpu). A launch runs the grid's blocks one after another; each block
// runs as blockDim.x std::threads, so __syncthreads and warp shuffles block and exchange values as
// on a GPU (a barrier per block and per warp of 32 threads). `__shared__` becomes a function-static
// array: with one block at a time, that is the block's shared memory.
//
// What this does not emulate: concurrent blocks, the GPU memory model, the device's rounding
// (fdm_math.h: same formulas on host and device; FMA contraction and expf differ), launch limits,
// performance.
#pragma once

#include <math.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace fdm_emu {

// The SM count the launchers size their grids by (small: grid-stride loops really loop).
inline int g_sm_count = 2;
inline std::atomic<long> g_launches{0};

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return gen_ != gen; });
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  long gen_ = 0;
};

struct Block {
  explicit Block(int threads) : sync(threads), lanes(threads) {
    for (int w = 0; 32 * w < threads; ++w) warps.emplace_back(new Barrier(threads - 32 * w < 32 ? threads - 32 * w : 32));
  }
  Barrier sync;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<float> lanes;  // shuffle exchange, one slot per thread
};

inline thread_local dim3 t_thread, t_block, t_grid, t_block_dim;
inline thread_local Block* t_current = nullptr;

// A kernel without barriers or shuffles runs its threads one after another in this OS thread
// (`cooperative` false: a barrier there throws, so a misclassified kernel fails loudly); one with
// them (`cooperative` true: the translator's choice, from the kernel's source) gets real threads.
template <bool cooperative, class Body>
void launch(dim3 grid, dim3 block, Body&& body) {
  if (block.y != 1 || block.z != 1 || grid.z != 1) throw std::runtime_error("cuda_on_cpu: only 1-D blocks, 2-D grids");
  if (grid.x == 0 || grid.y == 0 || grid.y > 65535 || block.x == 0 || block.x > 1024)
    throw std::runtime_error("cuda_on_cpu: a launch configuration a GPU would refuse");
  ++g_launches;
  const int T = static_cast<int>(block.x);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      if (!cooperative) {
        t_block = dim3(bx, by);
        t_grid = grid;
        t_block_dim = block;
        t_current = nullptr;
        for (int t = 0; t < T; ++t) {
          t_thread = dim3(static_cast<unsigned>(t));
          body();
        }
        continue;
      }
      Block blk(T);
      std::exception_ptr err;
      std::mutex err_m;
      std::vector<std::thread> threads;
      threads.reserve(T);
      for (int t = 0; t < T; ++t) {
        threads.emplace_back([&, t] {
          t_thread = dim3(static_cast<unsigned>(t));
          t_block = dim3(bx, by);
          t_grid = grid;
          t_block_dim = block;
          t_current = &blk;
          try {
            body();
          } catch (...) {
            std::lock_guard<std::mutex> g(err_m);
            err = std::current_exception();
          }
        });
      }
      for (auto& th : threads) th.join();
      if (err) std::rethrow_exception(err);
    }
  }
}

}  // namespace fdm_emu

#define threadIdx (::fdm_emu::t_thread)
#define blockIdx (::fdm_emu::t_block)
#define gridDim (::fdm_emu::t_grid)
#define blockDim (::fdm_emu::t_block_dim)

namespace fdm_emu {
inline Block& cooperating() {
  if (!t_current) throw std::logic_error("cuda_on_cpu: a barrier or shuffle in a kernel launched as non-cooperative");
  return *t_current;
}
}  // namespace fdm_emu

inline void __syncthreads() { ::fdm_emu::cooperating().sync.wait(); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) throw std::runtime_error("cuda_on_cpu: only full-warp shuffles are emulated");
  ::fdm_emu::Block& b = ::fdm_emu::cooperating();
  const unsigned t = threadIdx.x;
  ::fdm_emu::Barrier& warp = *b.warps[t / 32];
  b.lanes[t] = v;
  warp.wait();
  const float r = b.lanes[t ^ static_cast<unsigned>(lane_mask)];
  warp.wait();
  return r;
}

inline const char* cudaGetErrorString(cudaError_t) { return "cuda_on_cpu"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = ::fdm_emu::g_sm_count;
  return cudaSuccess;
}

// 16-bit types: bits in a uint16_t, converted with round-to-nearest-even as CUDA's _rn intrinsics.
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return static_cast<float>(v);
}
inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}
