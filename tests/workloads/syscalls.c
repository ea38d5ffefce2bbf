/*
 * A syscall workload with known counts. Waits for a line on stdin, then, on its main thread:
 *   nanosleep(5 ms) N times       (raw SYS_nanosleep, from sleep_5ms through do_nanosleep)
 *   read(/dev/zero, 4096) M times (raw SYS_read)
 *   open("/nonexistent...") K times, failing with ENOENT (raw SYS_open)
 * and prints nanosleeps=N reads=M failed_opens=K.
 *
 *   syscalls [N] [M] [K]     defaults 100 2000 50
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) long do_nanosleep(long ns) {
    struct timespec ts = {0, ns};
    return syscall(SYS_nanosleep, &ts, NULL);
}

__attribute__((noinline)) void sleep_5ms(int n) {
    for (int i = 0; i < n; i++) do_nanosleep(5000000);
}

__attribute__((noinline)) void read_zero(int m) {
    static char buf[4096];
    int fd = open("/dev/zero", O_RDONLY);
    if (fd < 0) { perror("open /dev/zero"); exit(1); }
    for (int i = 0; i < m; i++)
        if (syscall(SYS_read, fd, buf, sizeof buf) != sizeof buf) { perror("read"); exit(1); }
    close(fd);
}

__attribute__((noinline)) void open_missing(int k) {
    for (int i = 0; i < k; i++)
        if (syscall(SYS_open, "/nonexistent/cprof-test", O_RDONLY) >= 0) exit(1);
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 100;
    int m = argc > 2 ? atoi(argv[2]) : 2000;
    int k = argc > 3 ? atoi(argv[3]) : 50;
    setvbuf(stdout, NULL, _IOLBF, 0);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 1;
    sleep_5ms(n);
    read_zero(m);
    open_missing(k);
    printf("nanosleeps=%d reads=%d failed_opens=%d\n", n, m, k);
    return 0;
}
