/* Crashes after a pause, optionally deleting its own binary first. */
#include <string.h>
#include <unistd.h>

int *volatile null_ptr; /* volatile: the compiler cannot see the NULL and drop the store */

__attribute__((noinline)) void crash_late(int *p) {
    *p = 42; /* MARK:late */
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "unlink"))
        unlink("/proc/self/exe") == 0 || unlink(argv[0]);
    usleep(100 * 1000);
    crash_late(null_ptr);
    return 0;
}
