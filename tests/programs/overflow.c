#include <stdio.h>
#include <string.h>

__attribute__((noinline)) int recurse(int depth) {
    volatile char pad[256];
    memset((char *)pad, depth, sizeof pad);
    return recurse(depth + 1) + pad[depth & 255]; /* MARK:recurse */
}

int main(void) {
    printf("%d\n", recurse(0));
    return 0;
}
