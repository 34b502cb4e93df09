/* ABBA deadlock: thread "ab" holds a and waits for b, thread "ba" holds b
 * and waits for a; main waits for "ab" forever. Nothing is printed. A
 * barrier once both hold their first mutex makes the deadlock certain,
 * however late either thread starts. */
#include <pthread.h>
#include <sys/prctl.h>

static pthread_mutex_t a = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t b = PTHREAD_MUTEX_INITIALIZER;
static pthread_barrier_t both_hold_one;

__attribute__((noinline)) void transfer_a_to_b(void) {
    pthread_mutex_lock(&a);
    pthread_barrier_wait(&both_hold_one); /* the other thread holds b */
    pthread_mutex_lock(&b); /* MARK:transfer_a_to_b */
    pthread_mutex_unlock(&b);
    pthread_mutex_unlock(&a);
}

__attribute__((noinline)) void transfer_b_to_a(void) {
    pthread_mutex_lock(&b);
    pthread_barrier_wait(&both_hold_one); /* the other thread holds a */
    pthread_mutex_lock(&a); /* MARK:transfer_b_to_a */
    pthread_mutex_unlock(&a);
    pthread_mutex_unlock(&b);
}

static void *ab_thread(void *arg) {
    (void)arg;
    prctl(PR_SET_NAME, "ab");
    transfer_a_to_b();
    return NULL;
}

static void *ba_thread(void *arg) {
    (void)arg;
    prctl(PR_SET_NAME, "ba");
    transfer_b_to_a();
    return NULL;
}

int main(void) {
    pthread_t t[2];
    pthread_barrier_init(&both_hold_one, NULL, 2);
    pthread_create(&t[0], NULL, ab_thread, NULL);
    pthread_create(&t[1], NULL, ba_thread, NULL);
    pthread_join(t[0], NULL); /* MARK:join */
    pthread_join(t[1], NULL);
    return 0;
}
