/*
 * Many busy threads with many distinct stacks: more (thread, stack) pairs than a small in-kernel
 * map holds, to make the profiler lose samples and stacks on purpose.
 *
 *   hotthreads THREADS SECONDS   waits for a line on stdin, then runs THREADS threads for
 *                                SECONDS; thread i recurses 1 + i % 32 levels of descend()
 *                                and spins in spin_leaf(), changing depth every few ms so each
 *                                thread visits many stacks. Prints threads=<THREADS>.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile int stop;
static volatile unsigned long sink;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) static void spin_leaf(void) {
    for (unsigned long i = 0; i < 200000; i++)
        sink += i;
}

__attribute__((noinline)) static void descend(int depth) {
    if (depth > 0)
        descend(depth - 1);
    else
        spin_leaf();
    sink++;
}

static void *worker(void *arg) {
    int i = (int)(long)arg;
    for (int round = 0; !stop; round++)
        descend(1 + (i + round) % 32);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: hotthreads THREADS SECONDS\n");
        return 2;
    }
    int n = atoi(argv[1]);
    double seconds = atof(argv[2]);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    pthread_t *threads = calloc(n, sizeof *threads);
    for (int i = 0; i < n; i++)
        pthread_create(&threads[i], NULL, worker, (void *)(long)i);
    double end = now() + seconds;
    while (now() < end) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    stop = 1;
    for (int i = 0; i < n; i++)
        pthread_join(threads[i], NULL);
    printf("threads=%d\n", n);
    return 0;
}
