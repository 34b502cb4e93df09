/* Faults, and waits inside its SIGSEGV handler: a dump then sees the
 * handler's frames, the kernel's signal frame, and the frames the fault
 * interrupted, all on one stack. */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

__attribute__((noinline)) void wait_in_handler(void) {
    printf("ready\n");
    fflush(stdout);
    while (!stop)
        pause(); /* MARK:wait */
}

static void on_segv(int sig) {
    wait_in_handler();
    stop = sig; /* not a tail call: on_segv keeps its frame */
}

__attribute__((noinline)) int faulty(volatile int *p) {
    *p = 7; /* MARK:fault */
    return 1;
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_segv;
    sigaction(SIGSEGV, &sa, NULL);
    return faulty((volatile int *)0x40) + 1; /* MARK:main */
}
