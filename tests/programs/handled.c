#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

static sigjmp_buf env;
static volatile int caught;

static void on_segv(int sig) {
    (void)sig;
    caught++;
    siglongjmp(env, 1);
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_segv;
    sigaction(SIGSEGV, &sa, NULL);
    for (int i = 0; i < 100; i++) {
        if (sigsetjmp(env, 1) == 0)
            *(volatile int *)(long)(16 + i) = 1; /* probe an unmapped page */
    }
    printf("survived %d faults\n", caught);
    return caught == 100 ? 0 : 1;
}
