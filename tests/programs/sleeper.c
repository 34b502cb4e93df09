/* Sleeps in a named function until killed. */
#include <unistd.h>

__attribute__((noinline)) void wait_to_be_killed(void) {
    for (;;)
        pause(); /* MARK:pause */
}

int main(void) {
    wait_to_be_killed();
    return 0;
}
