// Portability macros so one function body serves the C++ (CPU) and CUDA launchers.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FA_HD __host__ __device__ __forceinline__
#else
#define FA_HD inline
#endif
