/* Names itself and a second thread with strings that would forge report
 * lines or drive a terminal if printed raw, then crashes in main. comm
 * holds at most 15 bytes, so each name is cut to fit. */
#include <pthread.h>
#include <sys/prctl.h>
#include <unistd.h>

static pthread_barrier_t ready;

static void *hostile_thread(void *arg) {
    (void)arg;
    /* OSC 0 (set the terminal title), BEL, then RIGHT-TO-LEFT OVERRIDE. */
    prctl(PR_SET_NAME, "\x1b]0;pwn\x07\xe2\x80\xae" "ab");
    pthread_barrier_wait(&ready);
    for (;;)
        pause();
    return NULL;
}

int *volatile null_ptr; /* volatile: the compiler cannot see the NULL and drop the store */

__attribute__((noinline)) void crash_here(int *p) {
    *p = 1; /* MARK:crash */
}

int main(void) {
    pthread_t t;
    pthread_barrier_init(&ready, NULL, 2);
    pthread_create(&t, NULL, hostile_thread, NULL);
    /* A newline, then what a report's first line looks like. */
    prctl(PR_SET_NAME, "x\nFatal signal");
    pthread_barrier_wait(&ready);
    crash_here(null_ptr);
    return 0;
}
