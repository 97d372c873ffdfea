// timing.cu: what benchmarks need on the device (cuda/timing.rs).
#include "common.cuh"

// Keeps the stream busy for `ns` nanoseconds of the GPU's global timer. Launched before the work
// being timed, it lets the host queue every launch of a measurement before the GPU starts on them,
// so the measurement sees GPU time, not the host's launch rate.
extern "C" __global__ void spin_ns(unsigned long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
