#include <signal.h>
#include <string.h>
#include <unistd.h>

static void crash_reporter(int sig) {
    static const char msg[] = "crash_reporter: logging and re-raising\n";
    write(2, msg, sizeof msg - 1);
    signal(sig, SIG_DFL);
    raise(sig);
}

__attribute__((noinline)) void faulty_function(volatile int *p) {
    *p = 7; /* MARK:faulty */
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = crash_reporter;
    sigaction(SIGSEGV, &sa, NULL);
    faulty_function((volatile int *)0x40); /* MARK:main */
    return 0;
}
