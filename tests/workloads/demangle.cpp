// A C++ workload for demangling: its hot functions have mangled names (a namespace, a class
// method, a template instance). Runs for SECONDS (default 5).
#include <chrono>
#include <cstdlib>

namespace shapes {
struct Spinner {
    __attribute__((noinline)) unsigned long spin(unsigned long x);
};

__attribute__((noinline)) void tick() { asm volatile("" ::: "memory"); }

unsigned long Spinner::spin(unsigned long x) {
    for (int i = 0; i < 100000; i++) x = x * 2862933555777941757UL + 3037000493UL;
    tick();
    return x;
}
}  // namespace shapes

template <typename T>
__attribute__((noinline)) T churn(T x) {
    shapes::Spinner s;
    return s.spin(x);
}

int main(int argc, char** argv) {
    double seconds = argc > 1 ? std::atof(argv[1]) : 5.0;
    auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    volatile unsigned long sink = 1;
    while (std::chrono::steady_clock::now() < end) sink = churn<unsigned long>(sink);
    return 0;
}
