/* 1,000 threads parked in pause(); then main crashes. */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

#define THREADS 1000

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

int main(void) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_barrier_init(&ready, NULL, THREADS + 1);
    for (int i = 0; i < THREADS; i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, worker, NULL) != 0)
            return 1;
    }
    pthread_barrier_wait(&ready);
    usleep(100 * 1000);
    crash_main(null_ptr);
    return 0;
}
