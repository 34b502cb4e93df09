/* N threads (1,000 unless argv[1] says) parked in pause(); then main
 * crashes, or with argv[2] == "wait", prints "ready" and waits to be dumped. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static pthread_barrier_t ready;
int *volatile null_ptr; /* volatile: the compiler cannot see the NULL and drop the store */

__attribute__((noinline)) void park(void) {
    for (;;)
        pause(); /* MARK:park */
}

static void *worker(void *arg) {
    (void)arg;
    pthread_barrier_wait(&ready);
    park();
    return NULL;
}

__attribute__((noinline)) void crash_main(int *p) {
    *p = 1; /* MARK:crash */
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1000;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_barrier_init(&ready, NULL, threads + 1);
    for (int i = 0; i < threads; i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, worker, NULL) != 0)
            return 1;
    }
    pthread_barrier_wait(&ready);
    if (argc > 2 && strcmp(argv[2], "wait") == 0) {
        printf("ready\n");
        fflush(stdout);
        park();
    }
    usleep(100 * 1000);
    crash_main(null_ptr);
    return 0;
}
