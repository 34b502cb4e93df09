/* Three named threads blocked in different places; then main crashes. */
#include <pthread.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t never = PTHREAD_COND_INITIALIZER;
static pthread_barrier_t ready;
static int pipefd[2];

__attribute__((noinline)) void wait_for_condition(void) {
    pthread_mutex_lock(&lock);
    pthread_barrier_wait(&ready);
    pthread_cond_wait(&never, &lock); /* MARK:condvar */
    pthread_mutex_unlock(&lock);
}

__attribute__((noinline)) void nap_forever(void) {
    pthread_barrier_wait(&ready);
    for (;;)
        sleep(1000); /* MARK:sleep */
}

__attribute__((noinline)) void read_the_pipe(void) {
    char c;
    pthread_barrier_wait(&ready);
    while (read(pipefd[0], &c, 1) > 0) /* MARK:read */
        ;
}

static void *condvar_thread(void *arg) {
    (void)arg;
    prctl(PR_SET_NAME, "waiter");
    wait_for_condition();
    return NULL;
}

static void *sleep_thread(void *arg) {
    (void)arg;
    prctl(PR_SET_NAME, "sleeper");
    nap_forever();
    return NULL;
}

static void *read_thread(void *arg) {
    (void)arg;
    prctl(PR_SET_NAME, "reader");
    read_the_pipe();
    return NULL;
}

int *volatile null_ptr; /* volatile: the compiler cannot see the NULL and drop the store */

__attribute__((noinline)) void crash_main(int *p) {
    *p = 1; /* MARK:crash */
}

int main(void) {
    pthread_t t[3];
    if (pipe(pipefd) != 0)
        return 1;
    pthread_barrier_init(&ready, NULL, 4);
    pthread_create(&t[0], NULL, condvar_thread, NULL);
    pthread_create(&t[1], NULL, sleep_thread, NULL);
    pthread_create(&t[2], NULL, read_thread, NULL);
    pthread_barrier_wait(&ready);
    usleep(200 * 1000); /* let each thread block in the kernel */
    pthread_mutex_lock(&lock); /* the waiter has released it inside pthread_cond_wait */
    pthread_mutex_unlock(&lock);
    crash_main(null_ptr);
    return 0;
}
