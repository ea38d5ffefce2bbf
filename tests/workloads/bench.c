/*
 * Benchmark workloads with a fixed amount of work; each prints elapsed_ns=<wall time of the work>.
 *
 *   bench cpu N        N units of computation on one thread (a unit calls a tiny function)
 *   bench pingpong N   N round trips of a byte between two threads over two pipes
 *   bench syscalls N   N getppid() syscalls, the cheapest there is
 *   bench connects N   N connect/close of a TCP connection to a listener on 127.0.0.1
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static volatile unsigned long sink;

__attribute__((noinline)) void unit(void) {
    unsigned long x = sink;
    for (int i = 0; i < 10000; i++) x = x * 6364136223846793005UL + 1442695040888963407UL;
    sink = x;
}

static int a[2], b[2];
static long rounds;

static void *pong(void *arg) {
    (void)arg;
    char c;
    for (long i = 0; i < rounds; i++) {
        if (read(a[0], &c, 1) != 1 || write(b[1], &c, 1) != 1) exit(1);
    }
    return NULL;
}

static void *acceptor(void *arg) {
    int lfd = (int)(long)arg;
    for (;;) {
        int c = accept(lfd, NULL, NULL);
        if (c < 0) return NULL;
        close(c);
    }
}

static void connects(long n) {
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) || listen(lfd, 4096)) exit(1);
    getsockname(lfd, (struct sockaddr *)&a, &len);
    pthread_t t;
    pthread_create(&t, NULL, acceptor, (void *)(long)lfd);
    for (long i = 0; i < n; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) exit(1);
        close(fd);
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: bench cpu|pingpong|syscalls N\n");
        return 2;
    }
    long n = atol(argv[2]);
    long long t0 = now_ns();
    if (strcmp(argv[1], "cpu") == 0) {
        for (long i = 0; i < n; i++) unit();
    } else if (strcmp(argv[1], "pingpong") == 0) {
        rounds = n;
        if (pipe(a) || pipe(b)) return 1;
        pthread_t t;
        pthread_create(&t, NULL, pong, NULL);
        char c = 'x';
        for (long i = 0; i < n; i++) {
            if (write(a[1], &c, 1) != 1 || read(b[0], &c, 1) != 1) return 1;
        }
        pthread_join(t, NULL);
    } else if (strcmp(argv[1], "connects") == 0) {
        connects(n);
    } else if (strcmp(argv[1], "syscalls") == 0) {
        for (long i = 0; i < n; i++) syscall(SYS_getppid);
    } else {
        fprintf(stderr, "unknown workload %s\n", argv[1]);
        return 2;
    }
    printf("elapsed_ns=%lld\n", now_ns() - t0);
    return 0;
}
