/*
 * TCP workloads. Each waits for a line on stdin, does its work, prints what it did and exits.
 *
 *   tcp loopback6 N BYTES M  the same over IPv6, on ::1.
 *   tcp loopback N BYTES M   a listener on 127.0.0.1 (thread "server" reads to EOF); the main
 *                            thread connects N times from open_connection, sends BYTES and
 *                            closes; then connects M times to a closed port (refused).
 *                            Prints port=<P> closed_port=<Q> connects=<N> refused=<M>.
 *   tcp client HOST PORT BYTES   one connection from send_slowly: sends BYTES in 1 KiB writes
 *                            over about a second, shuts its side down and waits for the
 *                            server to close (so every byte is acknowledged and the socket
 *                            closed before it exits). Prints sent=<BYTES>.
 *   tcp server HOST PORT     accepts one connection, reads to EOF, prints received=<N>.
 *   tcp burst SECONDS        connect/close to a local listener as fast as it goes; prints
 *                            connects=<N>.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int family = AF_INET;

static socklen_t make_addr(struct sockaddr_storage *ss, const char *host, int port) {
    memset(ss, 0, sizeof *ss);
    if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        inet_pton(AF_INET6, host, &a->sin6_addr);
        return sizeof *a;
    }
    struct sockaddr_in *a = (struct sockaddr_in *)ss;
    a->sin_family = AF_INET;
    a->sin_port = htons(port);
    inet_pton(AF_INET, host, &a->sin_addr);
    return sizeof *a;
}

static int port_of(const struct sockaddr_storage *ss) {
    return ntohs(family == AF_INET6 ? ((const struct sockaddr_in6 *)ss)->sin6_port
                                    : ((const struct sockaddr_in *)ss)->sin_port);
}

static int listen_on(const char *host, int port, int *bound_port) {
    int fd = socket(family, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_storage a;
    socklen_t len = make_addr(&a, host, port);
    if (bind(fd, (struct sockaddr *)&a, len) || listen(fd, 4096)) { perror("listen"); exit(1); }
    len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    if (bound_port) *bound_port = port_of(&a);
    return fd;
}

/* Calls connect directly, so a frame-pointer unwinder skips it and shows its caller. */
__attribute__((noinline)) int do_connect(int fd, struct sockaddr_storage *a, socklen_t len) {
    return connect(fd, (struct sockaddr *)a, len);
}

__attribute__((noinline)) int open_connection(const char *host, int port) {
    int fd = socket(family, SOCK_STREAM, 0);
    struct sockaddr_storage a;
    socklen_t len = make_addr(&a, host, port);
    if (do_connect(fd, &a, len) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void *drain_all(void *arg) {
    int lfd = (int)(long)arg;
    char buf[65536];
    for (;;) {
        int c = accept(lfd, NULL, NULL);
        if (c < 0) return NULL;
        while (read(c, buf, sizeof buf) > 0) {}
        close(c);
    }
}

static void send_all(int fd, const char *buf, long n) {
    while (n > 0) {
        long w = write(fd, buf, n > 65536 ? 65536 : n);
        if (w <= 0) { perror("write"); exit(1); }
        n -= w;
    }
}

__attribute__((noinline)) void send_slowly(int fd, long bytes) {
    static char buf[1024];
    struct timespec pause = {0, 1000000000L / (bytes / 1024 + 1)};
    for (long sent = 0; sent < bytes; sent += 1024) {
        send_all(fd, buf, bytes - sent < 1024 ? bytes - sent : 1024);
        nanosleep(&pause, NULL);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: see the source\n"); return 2; }
    setvbuf(stdout, NULL, _IOLBF, 0);
    char line[64];
    if (strcmp(argv[1], "server") == 0) {
        int lfd = listen_on(argv[2], atoi(argv[3]), NULL);
        printf("listening\n");
        int c = accept(lfd, NULL, NULL);
        char buf[65536];
        long total = 0, r;
        while ((r = read(c, buf, sizeof buf)) > 0) total += r;
        printf("received=%ld\n", total);
        return 0;
    }
    if (!fgets(line, sizeof line, stdin)) return 1;
    if (strcmp(argv[1], "loopback6") == 0) {
        family = AF_INET6;
        argv[1] = "loopback";
    }
    const char *local = family == AF_INET6 ? "::1" : "127.0.0.1";
    if (strcmp(argv[1], "loopback") == 0 && argc >= 5) {
        int n = atoi(argv[2]), m = atoi(argv[4]);
        long bytes = atol(argv[3]);
        int port;
        int lfd = listen_on(local, 0, &port);
        pthread_t t;
        pthread_create(&t, NULL, drain_all, (void *)(long)lfd);
        char *buf = calloc(1, bytes + 1);
        for (int i = 0; i < n; i++) {
            int fd = open_connection(local, port);
            if (fd < 0) { perror("connect"); return 1; }
            send_all(fd, buf, bytes);
            close(fd);
        }
        int closed_port;
        close(listen_on(local, 0, &closed_port));
        int refused = 0;
        for (int i = 0; i < m; i++) refused += open_connection(local, closed_port) < 0;
        usleep(200000); /* let the server finish reading */
        printf("port=%d closed_port=%d connects=%d refused=%d\n", port, closed_port, n, refused);
        return 0;
    }
    if (strcmp(argv[1], "client") == 0 && argc >= 5) {
        int fd = open_connection(argv[2], atoi(argv[3]));
        if (fd < 0) { perror("connect"); return 1; }
        send_slowly(fd, atol(argv[4]));
        shutdown(fd, SHUT_WR);
        char buf[256];
        while (read(fd, buf, sizeof buf) > 0) {}
        close(fd);
        printf("sent=%s\n", argv[4]);
        return 0;
    }
    if (strcmp(argv[1], "burst") == 0 && argc >= 3) {
        int port;
        int lfd = listen_on("127.0.0.1", 0, &port);
        pthread_t t;
        pthread_create(&t, NULL, drain_all, (void *)(long)lfd);
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        double end = ts.tv_sec + ts.tv_nsec / 1e9 + atof(argv[2]);
        long n = 0;
        for (;;) {
            clock_gettime(CLOCK_MONOTONIC, &ts);
            if (ts.tv_sec + ts.tv_nsec / 1e9 >= end) break;
            int fd = open_connection("127.0.0.1", port);
            if (fd < 0) { perror("connect"); return 1; }
            close(fd);
            n++;
        }
        usleep(200000);
        printf("connects=%ld\n", n);
        return 0;
    }
    fprintf(stderr, "bad arguments\n");
    return 2;
}
