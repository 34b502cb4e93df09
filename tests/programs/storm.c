/* A crash storm of one bug: forks N children (argv[1], default 1000)
 * spread over about S seconds (argv[2], default 10); each child crashes
 * in crash_here(). Prints how many children died of SIGSEGV. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) void crash_here(volatile int *p) {
    *p = 1; /* MARK:crash */
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1000;
    double secs = argc > 2 ? atof(argv[2]) : 10.0;
    double gap = secs / (n > 0 ? n : 1);
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    int segv = 0;
    for (int i = 0; i < n; i++) {
        pid_t p = fork();
        if (p == 0) {
            crash_here((volatile int *)0);
            _exit(0);
        }
        int st = 0;
        if (p > 0 && waitpid(p, &st, 0) == p && WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV)
            segv++;
        /* Paced against the start, not the last crash: N in S seconds. */
        double due = (i + 1) * gap;
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        double spent = (now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9;
        if (due > spent)
            usleep((useconds_t)((due - spent) * 1e6));
    }
    printf("%d\n", segv);
    return 0;
}
