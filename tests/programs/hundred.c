/* 100 threads "worker-00".."worker-99", each blocked at its own depth:
 * worker-NN calls depth_call(NN), which recurses down to depth_call(0),
 * which blocks in block_here(); so worker-NN has NN+1 depth_call frames
 * between block_here and worker_main. Once every thread is blocked, main
 * prints "ready" and waits in pause() forever. */
#include <pthread.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>

#define NTHREADS 100

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t never = PTHREAD_COND_INITIALIZER;
static pthread_cond_t all_blocked = PTHREAD_COND_INITIALIZER;
static int blocked;
static volatile int released; /* never set: the wait loop has an exit the compiler cannot rule out */
static volatile int sink;     /* stores after the calls keep them from being tail calls */

__attribute__((noinline)) int block_here(void) {
    pthread_mutex_lock(&lock);
    if (++blocked == NTHREADS)
        pthread_cond_signal(&all_blocked);
    while (!released)
        pthread_cond_wait(&never, &lock); /* MARK:wait */
    pthread_mutex_unlock(&lock);
    return 0;
}

__attribute__((noinline)) int depth_call(int n) {
    int r;
    if (n == 0)
        r = block_here(); /* MARK:block */
    else
        r = depth_call(n - 1) + 1; /* MARK:recurse */
    sink = r;
    return r;
}

static void *worker_main(void *arg) {
    int i = (int)(long)arg;
    char name[16];
    snprintf(name, sizeof name, "worker-%02d", i);
    prctl(PR_SET_NAME, name);
    sink = depth_call(i);
    return NULL;
}

int main(void) {
    pthread_t t[NTHREADS];
    for (long i = 0; i < NTHREADS; i++)
        if (pthread_create(&t[i], NULL, worker_main, (void *)i) != 0)
            return 1;
    pthread_mutex_lock(&lock);
    while (blocked < NTHREADS)
        pthread_cond_wait(&all_blocked, &lock);
    /* Every worker has released the lock inside pthread_cond_wait. */
    pthread_mutex_unlock(&lock);
    usleep(100 * 1000); /* let the last ones reach the futex wait in the kernel */
    printf("ready\n");
    fflush(stdout);
    for (;;)
        pause(); /* MARK:pause */
}
