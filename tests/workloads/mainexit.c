/*
 *   mainexit [SECONDS]   two worker threads spin in mainexit_worker() for SECONDS (default 5)
 *                        while the main thread leaves with pthread_exit(): the process lives on
 *                        with a zombie main thread, whose /proc/<pid>/maps is empty.
 */
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

static volatile unsigned long sink;
static double run_seconds = 5.0;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) void *mainexit_worker(void *arg) {
    (void)arg;
    double end = now() + run_seconds;
    while (now() < end)
        for (unsigned long i = 0; i < 100000; i++)
            sink = sink * 6364136223846793005UL + 1442695040888963407UL;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1)
        run_seconds = atof(argv[1]);
    pthread_t workers[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&workers[i], NULL, mainexit_worker, NULL);
    pthread_exit(NULL);
}
