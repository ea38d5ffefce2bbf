/*
 * A workload whose CPU time splits by construction:
 *
 *   calltree [SECONDS]          a worker thread "cpt-worker" runs 7 units of work in path_a for
 *                               every 3 in path_b: 70% / 30% of its CPU time.
 *   calltree --kernel [SECONDS] the worker reads /dev/zero in a loop: time in the kernel.
 *
 * Built with frame pointers (-fno-omit-frame-pointer -mno-omit-leaf-frame-pointer, and
 * -fno-optimize-sibling-calls so that no tail call drops a frame) so that a
 * frame-pointer unwinder sees every caller. Both paths do their work in the same always-inline
 * function, so their samples carry an inlined frame (mix_inline inside path_a or path_b) and a
 * unit costs the same in both. The process itself is "calltree".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define UNIT 200000UL

static volatile unsigned long sink;
static double run_seconds = 5.0;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Called once per unit so that path_a and path_b are never leaves. */
__attribute__((noinline)) void tick(void) { sink++; }

static inline __attribute__((always_inline)) unsigned long mix_inline(unsigned long x) {
    for (unsigned long i = 0; i < UNIT; i++)
        x = x * 6364136223846793005UL + 1442695040888963407UL;
    return x;
}

__attribute__((noinline)) void path_a(void) {
    sink = mix_inline(sink);
    tick();
}

__attribute__((noinline)) void path_b(void) {
    sink = mix_inline(sink);
    tick();
}

/*
 * Rounds of 10 units, 7 of path_a and 3 of path_b, in a random order: the split is exact, and
 * the order has no period for a fixed-rate sampler to alias with.
 */
__attribute__((noinline)) void cpu_work(void) {
    unsigned int seed = 12345;
    double end = now() + run_seconds;
    while (now() < end) {
        char deck[10] = {1, 1, 1, 1, 1, 1, 1, 0, 0, 0};
        for (int i = 9; i > 0; i--) {
            int j = rand_r(&seed) % (i + 1);
            char t = deck[i]; deck[i] = deck[j]; deck[j] = t;
        }
        for (int i = 0; i < 10; i++) {
            if (deck[i]) path_a(); else path_b();
        }
    }
}

__attribute__((noinline)) void kernel_work(void) {
    static char buf[1 << 20];
    int fd = open("/dev/zero", O_RDONLY);
    if (fd < 0) { perror("open /dev/zero"); exit(1); }
    double end = now() + run_seconds;
    while (now() < end) {
        if (read(fd, buf, sizeof buf) < 0) { perror("read"); exit(1); }
        tick();
    }
    close(fd);
}

static void *worker(void *arg) {
    prctl(PR_SET_NAME, "cpt-worker");
    if (arg) kernel_work(); else cpu_work();
    return NULL;
}

int main(int argc, char **argv) {
    int kernel = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--kernel") == 0) kernel = 1;
        else run_seconds = atof(argv[i]);
    }
    prctl(PR_SET_NAME, "calltree");
    pthread_t t;
    if (pthread_create(&t, NULL, worker, kernel ? (void *)1 : NULL) != 0) { perror("pthread_create"); return 1; }
    pthread_join(t, NULL);
    return 0;
}
