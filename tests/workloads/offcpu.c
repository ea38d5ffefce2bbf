/*
 * Off-CPU workloads with known waits. Each mode waits for a line on stdin before it starts
 * (so a profiler can attach first), runs for SECONDS, prints what it measured and exits.
 *
 *   offcpu sleeps SECONDS     thread "sleeper": 6 ms in sleep_long, 2 ms in sleep_short, in turn
 *                             (75% / 25% of its blocked time); prints blocked_ns=<N>.
 *   offcpu pingpong SECONDS   threads "pinger" and "ponger" bounce a byte over two pipes: the
 *                             ponger waits in pong_wait and is woken by the pinger in ping_send.
 *   offcpu saturate SECONDS   4 busy threads "spinner" on fewer CPUs: they wait runnable (R).
 *   offcpu churn SECONDS      short-lived threads and processes, many per second, beside a
 *                             crowd of 100 threads that keep sleeping 20 ms; prints
 *                             threads=<N> processes=<M>.
 *
 * A function that calls a libc syscall wrapper directly is not seen by a frame-pointer unwinder
 * (the wrapper keeps no frame), so each wait goes through a small helper: do_sleep, wait_read,
 * send_write.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double run_seconds = 3.0;
static volatile int stop;

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

__attribute__((noinline)) long long do_sleep(long ns) {
    struct timespec ts = {0, ns};
    long long t0 = now_ns();
    nanosleep(&ts, NULL);
    return now_ns() - t0;
}

__attribute__((noinline)) long long sleep_long(void) { return do_sleep(6000000); }
__attribute__((noinline)) long long sleep_short(void) { return do_sleep(2000000); }

static void *sleeper(void *arg) {
    (void)arg;
    prctl(PR_SET_NAME, "sleeper");
    long long blocked = 0, end = now_ns() + (long long)(run_seconds * 1e9);
    int rounds = 0;
    while (now_ns() < end) {
        blocked += sleep_long();
        blocked += sleep_short();
        rounds++;
    }
    printf("blocked_ns=%lld rounds=%d\n", blocked, rounds);
    return NULL;
}

static int ping_pipe[2], pong_pipe[2];

__attribute__((noinline)) void wait_read(int fd) {
    char c;
    if (read(fd, &c, 1) != 1) exit(1);
}
__attribute__((noinline)) void send_write(int fd) {
    char c = 'x';
    if (write(fd, &c, 1) != 1) exit(1);
}
__attribute__((noinline)) void ping_send(void) { send_write(ping_pipe[1]); }
__attribute__((noinline)) void ping_wait(void) { wait_read(pong_pipe[0]); }
__attribute__((noinline)) void pong_wait(void) { wait_read(ping_pipe[0]); }
__attribute__((noinline)) void pong_send(void) { send_write(pong_pipe[1]); }

static void *pinger(void *arg) {
    (void)arg;
    prctl(PR_SET_NAME, "pinger");
    long long end = now_ns() + (long long)(run_seconds * 1e9);
    long n = 0;
    while (now_ns() < end) {
        ping_send();
        ping_wait();
        n++;
    }
    stop = 1;
    ping_send();
    printf("round_trips=%ld\n", n);
    return NULL;
}

static void *ponger(void *arg) {
    (void)arg;
    prctl(PR_SET_NAME, "ponger");
    for (;;) {
        pong_wait();
        if (stop) break;
        pong_send();
    }
    return NULL;
}

__attribute__((noinline)) void spin_forever(void) {
    volatile unsigned long x = 0;
    while (!stop) x++;
}

static void *spinner(void *arg) {
    (void)arg;
    prctl(PR_SET_NAME, "spinner");
    spin_forever();
    return NULL;
}

static void *crowd(void *arg) {
    (void)arg;
    while (!stop) do_sleep(20000000);
    return NULL;
}

static void *short_life(void *arg) {
    (void)arg;
    do_sleep(200000);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: offcpu sleeps|pingpong|saturate|churn [SECONDS]\n");
        return 2;
    }
    if (argc > 2) run_seconds = atof(argv[2]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 1; /* wait for "go" */
    pthread_t t[4];
    if (strcmp(argv[1], "sleeps") == 0) {
        pthread_create(&t[0], NULL, sleeper, NULL);
        pthread_join(t[0], NULL);
    } else if (strcmp(argv[1], "pingpong") == 0) {
        if (pipe(ping_pipe) || pipe(pong_pipe)) return 1;
        pthread_create(&t[1], NULL, ponger, NULL);
        pthread_create(&t[0], NULL, pinger, NULL);
        pthread_join(t[0], NULL);
        pthread_join(t[1], NULL);
    } else if (strcmp(argv[1], "saturate") == 0) {
        for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, spinner, NULL);
        do_sleep(0);
        struct timespec ts = {(time_t)run_seconds, (long)((run_seconds - (time_t)run_seconds) * 1e9)};
        nanosleep(&ts, NULL);
        stop = 1;
        for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    } else if (strcmp(argv[1], "churn") == 0) {
        pthread_t crowds[100];
        for (int i = 0; i < 100; i++) pthread_create(&crowds[i], NULL, crowd, NULL);
        long long end = now_ns() + (long long)(run_seconds * 1e9);
        long threads = 0, processes = 0;
        while (now_ns() < end) {
            pthread_t s;
            pthread_create(&s, NULL, short_life, NULL);
            pthread_join(s, NULL);
            threads++;
            pid_t child = fork();
            if (child == 0) {
                do_sleep(200000);
                _exit(0);
            }
            waitpid(child, NULL, 0);
            processes++;
        }
        stop = 1;
        for (int i = 0; i < 100; i++) pthread_join(crowds[i], NULL);
        printf("threads=%ld processes=%ld\n", threads, processes);
    } else {
        fprintf(stderr, "unknown mode %s\n", argv[1]);
        return 2;
    }
    return 0;
}
