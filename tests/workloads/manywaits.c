/*
 * Off-CPU waits from many distinct stacks: more than an off-CPU stack map keeps for long.
 *
 *   manywaits BITS ROUNDS   waits for a line on stdin; then, ROUNDS times, for every number
 *                           below 2^BITS, descends BITS levels through left() or right() (one
 *                           bit each, so every number is its own user stack) and sleeps 1 us at
 *                           the bottom in wait_here(). Prints waits=<N>.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile unsigned long sink;
static void step(unsigned long path, int level);

__attribute__((noinline)) static void wait_here(void) {
    struct timespec ts = {0, 1000};
    nanosleep(&ts, NULL);
    sink++;
}

__attribute__((noinline)) static void left(unsigned long path, int level) {
    step(path, level);
    sink++;
}

__attribute__((noinline)) static void right(unsigned long path, int level) {
    step(path, level);
    sink++;
}

static void step(unsigned long path, int level) {
    if (level == 0) {
        wait_here();
        return;
    }
    if (path & 1)
        right(path >> 1, level - 1);
    else
        left(path >> 1, level - 1);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: manywaits BITS ROUNDS\n");
        return 2;
    }
    int bits = atoi(argv[1]);
    int rounds = atoi(argv[2]);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    unsigned long waits = 0;
    for (int r = 0; r < rounds; r++)
        for (unsigned long path = 0; path < (1UL << bits); path++) {
            step(path, bits);
            waits++;
        }
    printf("waits=%lu\n", waits);
    return 0;
}
