/* Waits in a named function; each SIGUSR1 is a "reload": prints
 * "reloaded N" and waits again. Prints "ready" before the first wait. */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t reloads;

static void on_sigusr1(int sig) {
    (void)sig;
    reloads++;
}

/* Returns the reload count once it differs from `seen`. */
__attribute__((noinline)) int wait_for_work(int seen) {
    while (reloads == seen)
        pause(); /* MARK:pause */
    return reloads;
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigusr1;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGUSR1, &sa, NULL) != 0)
        return 1;
    printf("ready\n");
    fflush(stdout);
    int seen = 0;
    for (;;) {
        int now = wait_for_work(seen);
        for (; seen < now; seen++) {
            printf("reloaded %d\n", seen + 1);
            fflush(stdout);
        }
    }
}
