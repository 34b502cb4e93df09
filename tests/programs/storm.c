/* A crash storm of one bug: forks N children (argv[1], default 1000)
 * spread over about S seconds (argv[2], default 10); each child crashes
 * in crash_here(). Prints how many children died of SIGSEGV. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) void crash_here(volatile int *p) {
    *p = 1; /* MARK:crash */
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1000;
    double secs = argc > 2 ? atof(argv[2]) : 10.0;
    useconds_t gap = (useconds_t)(secs * 1e6 / (n > 0 ? n : 1));
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
        usleep(gap);
    }
    printf("%d\n", segv);
    return 0;
}
