/*
 *   dlspin LIBRARY SECONDS   loads LIBRARY with dlopen() and spins in its spinlib_work() for
 *                            SECONDS: the samples of this process land in a library file that
 *                            tests/integration/hostile.rs damages.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) int dlspin_main(const char *library, double seconds) {
    void *handle = dlopen(library, RTLD_NOW);
    if (!handle) {
        fprintf(stderr, "dlspin: %s\n", dlerror());
        return 1;
    }
    void (*work)(double) = (void (*)(double))dlsym(handle, "spinlib_work");
    if (!work) {
        fprintf(stderr, "dlspin: %s\n", dlerror());
        return 1;
    }
    work(seconds);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: dlspin LIBRARY SECONDS\n");
        return 2;
    }
    return dlspin_main(argv[1], atof(argv[2]));
}
