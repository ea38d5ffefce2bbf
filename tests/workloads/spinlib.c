/*
 * A shared library with one busy function, for tests/integration/hostile.rs: it is built with
 * `cc -shared -fPIC`, copied, damaged (truncated, section headers or compressed debug info
 * patched) and loaded by the `dlspin` workload, whose samples then land in this file.
 */
#include <time.h>

static volatile unsigned long sink;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) void spinlib_work(double seconds) {
    double end = now() + seconds;
    while (now() < end)
        for (unsigned long i = 0; i < 100000; i++)
            sink = sink * 6364136223846793005UL + 1442695040888963407UL;
}
