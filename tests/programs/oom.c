#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Allocates and touches memory until the memory cgroup's OOM killer ends it. */
__attribute__((noinline)) void hog_memory(void) {
    for (;;) {
        char *p = malloc(1 << 20);
        if (!p)
            continue;
        memset(p, 0x5a, 1 << 20); /* MARK:hog */
    }
}

int main(void) {
    hog_memory();
    return 0;
}
